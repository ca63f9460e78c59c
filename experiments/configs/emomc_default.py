"""EMOMC (pruning + quantization) on the default model: resnet20 on the embedded Fashion-MNIST.

Two stages (see nemo_jax/_src/emomc):

  nemo-jax prune-library --config experiments/configs/emomc_default.py   # stage I
  nemo-jax search --config experiments/configs/emomc_default.py --out runs/emomc_default
  nemo-jax emomc-report runs/emomc_default                                # the table

Stage I here is a CPU-sized library (keep 0.20..0.80 in steps of 0.05, "chain" schedule,
2 pruning steps of 25 optimizer steps each per ratio: a few minutes on 2 cores); the
paper's settings (steps of 0.01, 32 steps x 1 epoch, each ratio from the trained model)
are in `paper_library_config()` / experiments/configs/emomc_vgg16_cifar.py.

Environment switches:
  EMOMC_OPTIMIZER = nsga2 (default: one SBX + polynomial-mutation species ranked by
    NSGA-II, EMOMC's optimiser) | nemo (NEMO's four species; p is the GNN genomes'
    keep_logits / the direct genomes' keep gene)
  EMOMC_MODE = energy (default: minimise (error, energy X|Y) with size CSR <= bound) |
    size (minimise (error, size CSR) with energy X|Y <= bound)
  EMOMC_LIBRARY = the library directory (default runs/emomc_library_default)
All objectives are minimised (accuracy enters as top-1 error).
"""

import os

KEEP_RATIOS = [round(0.20 + 0.05 * i, 2) for i in range(13)]      # 0.20 .. 0.80
LIBRARY = os.environ.get("EMOMC_LIBRARY", "runs/emomc_library_default")
# resnet20 (270,608 conv/dense weights): FP32 is 1057 KB (normal coding) and 127.5
# (0.01 mJ, X|Y; `nemo-jax costs resnet20 --uniform 32,32`); the bounds ask for >= 8x
# smaller storage than FP32 normal coding / >= 4x less energy.
SIZE_BOUND_KB = 132.0
ENERGY_BOUND = 32.0


def get_library_config():
  """Stage I (`nemo-jax prune-library --config THIS_FILE`): a CPU-sized library."""
  return {
      "model_name": "resnet20",
      "checkpoint": "default",
      "dataset": "fashion_mnist_embedded",
      "out_dir": LIBRARY,
      "keep_ratios": KEEP_RATIOS,
      "schedule": "chain",
      "steps": 2,
      "steps_per_stage": 25,
      "batch_size": 128,
      "learning_rate": 0.01,
      "seed": 0,
  }


def paper_library_config():
  """EMOMC's stage I: 1% steps, 32 pruning steps of 1 epoch, every ratio from the trained model."""
  return {**get_library_config(), "keep_range": "0.2:0.8:0.01", "schedule": "independent",
          "steps": 32, "epochs_per_step": 1.0, "steps_per_stage": None}


def get_config():
  mode = os.environ.get("EMOMC_MODE", "energy")
  optimizer = os.environ.get("EMOMC_OPTIMIZER", "nsga2")
  if mode == "energy":
    objectives, constraints = ["top1_error", "energy:X|Y"], {"size_kb:csr": SIZE_BOUND_KB}
  else:
    objectives, constraints = ["top1_error", "size_kb:csr"], {"energy:X|Y": ENERGY_BOUND}
  if optimizer == "nemo":
    species = [{"kind": "direct_round"}, {"kind": "direct_floor"},
               {"kind": "gcn"}, {"kind": "graph_unet"}]
    selection, resize, min_size = "nsga3", True, 4
  else:
    species = [{"kind": "direct_round", "sbx_prob": 0.9, "sbx_eta": 15.0, "pm_eta": 20.0}]
    selection, resize, min_size = "nsga2", False, 4
  return {
      "model": "resnet20",
      "checkpoint": "default",
      "dataset": "fashion_mnist_embedded",
      "library": LIBRARY,
      "eval_split": "train",
      "eval_per_class": 25,
      "final_split": "test",
      "final_max_images": 2000,
      "objectives": objectives,
      "constraints": constraints,
      "bit_choices": list(range(2, 13)),
      "quantize_activations": False,
      "fixed_act_bits": 16,
      "keep_choices": KEEP_RATIOS,
      "population": 40,
      "generations": 30,
      "species": species,
      "selection": selection,
      "resize": resize,
      "min_species_size": min_size,
      "seed": 0,
  }
