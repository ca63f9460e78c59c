"""EMOMC (pruning + quantization) on the default model: resnet20 on the embedded Fashion-MNIST.

Two stages (see nemo_jax/_src/emomc):

  nemo-jax prune-library --config experiments/configs/emomc_default.py   # stage I
  nemo-jax search --config experiments/configs/emomc_default.py --out runs/emomc_default
  nemo-jax emomc-report runs/emomc_default                                # the table

Stage I here is a CPU-sized library (keep 0.20..0.80 in steps of 0.05, "chain" schedule,
2 pruning steps of 25 optimizer steps each per ratio: 7 min wall / 573 CPU-seconds on an
idle 2-core CPU, measured with ``/usr/bin/time``); the
paper's settings (steps of 0.01, 32 steps x 1 epoch, each ratio from the trained model)
are the ``paper`` variant of the library config and experiments/configs/emomc_vgg16_cifar.py.

Variants (big_vision style, ``--config experiments/configs/emomc_default.py:VARIANT``),
comma-separated tokens:
  energy (default: minimise (error, energy X|Y) with size CSR <= bound) |
    size (minimise (error, size CSR) with energy X|Y <= bound);
  nsga2 (default: one SBX + polynomial-mutation species ranked by NSGA-II, EMOMC's
    optimiser) | nemo (NEMO's four species; p is the GNN genomes' keep_logits / the
    direct genomes' keep gene);
  library=DIR (default runs/emomc_library_default);
  quant (keep_choices=[1.0]: the searched quantization-only baseline of the report).
e.g. ``emomc_default.py:size,nemo``. The library stage takes ``paper`` and ``library=DIR``.
All objectives are minimised (accuracy enters as top-1 error).
"""

from nemo_jax import parse_config_variant

KEEP_RATIOS = [round(0.20 + 0.05 * i, 2) for i in range(13)]      # 0.20 .. 0.80
LIBRARY = "runs/emomc_library_default"
# resnet20 (270,608 conv/dense weights): FP32 is 1057 KB (normal coding) and 127.5
# (0.01 mJ, X|Y; `nemo-jax costs resnet20 --uniform 32,32`); the bounds ask for >= 8x
# smaller storage than FP32 normal coding / >= 4x less energy.
SIZE_BOUND_KB = 132.0
ENERGY_BOUND = 32.0


def get_library_config(arg=None):
  """Stage I (`nemo-jax prune-library --config THIS_FILE[:paper]`)."""
  v = parse_config_variant(arg, {"setup": ("cpu", "paper")}, {"setup": "cpu", "library": LIBRARY},
                           keys=("library",))
  config = {
      "model": "resnet20",
      "checkpoint": "default",
      "dataset": "fashion_mnist_embedded",
      "out_dir": v["library"],
      "keep_ratios": KEEP_RATIOS,
      "schedule": "chain",
      "steps": 2,
      "steps_per_stage": 25,
      "batch_size": 128,
      "learning_rate": 0.01,
      "seed": 0,
  }
  if v["setup"] == "paper":  # EMOMC: 1% steps, 32 x 1 epoch, every ratio from the trained model
    config.update({"keep_ratios": None, "keep_range": "0.2:0.8:0.01",
                   "schedule": "independent", "steps": 32, "epochs_per_step": 1.0,
                   "steps_per_stage": None})
  return config


def get_config(arg=None):
  v = parse_config_variant(
      arg, {"mode": ("energy", "size"), "optimizer": ("nsga2", "nemo"),
            "keep": ("pruned", "quant")},
      {"mode": "energy", "optimizer": "nsga2", "keep": "pruned", "library": LIBRARY},
      keys=("library",))
  if v["mode"] == "energy":
    objectives, constraints = ["top1_error", "energy:X|Y"], {"size_kb:csr": SIZE_BOUND_KB}
  else:
    objectives, constraints = ["top1_error", "size_kb:csr"], {"energy:X|Y": ENERGY_BOUND}
  if v["optimizer"] == "nemo":
    species = [{"kind": "direct_round"}, {"kind": "direct_floor"},
               {"kind": "gcn"}, {"kind": "graph_unet"}]
    selection, resize = "nsga3", True
  else:
    species = [{"kind": "direct_round", "sbx_prob": 0.9, "sbx_eta": 15.0, "pm_eta": 20.0}]
    selection, resize = "nsga2", False
  return {
      "problem": {
          "model": "resnet20",
          "checkpoint": "default",
          "dataset": "fashion_mnist_embedded",
          "library": v["library"],
          "eval_split": "train",
          "eval_per_class": 25,
          "objectives": objectives,
          "constraints": constraints,
          "bit_choices": list(range(2, 13)),
          "quantize_activations": False,
          "quant": {"activation_format": "fp16", "weight_quant": "symmetric_per_tensor"},
          "keep_choices": KEEP_RATIOS if v["keep"] == "pruned" else [1.0],
      },
      "search": {
          "population": 40,
          "generations": 30,
          "species": species,
          "selection": selection,
          "resize": resize,
          "min_species_size": 4,
          "seed": 0,
      },
      "run": {
          "selection_per_class": 100,    # picks the table's members (emomc/report.py)
          "final_split": "test",
          "final_max_images": 2000,
      },
  }
