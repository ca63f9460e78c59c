"""EMOMC's reference setup: VGG-16 (CIFAR variant, 14.7M params) on CIFAR-10, for a GPU.

Needs a trained float checkpoint (variant key ``checkpoint=PATH``, default
vgg16_cifar.msgpack, e.g. from `nemo-jax train` with model vgg16_cifar on cifar10) and
CIFAR-10's python batches (``data_dir=DIR``, default ./cifar10).

  nemo-jax prune-library --config experiments/configs/emomc_vgg16_cifar.py    # stage I
  nemo-jax search --config experiments/configs/emomc_vgg16_cifar.py --out runs/emomc_vgg16
  nemo-jax emomc-report runs/emomc_vgg16

Stage I (paper): keep ratios 0.20..0.80 in steps of 0.01, each pruned from the trained
model in 32 steps of 1 epoch (per-step keep factor p^(1/32)) with retraining.
Stage II (paper): individuals [p, q_1..q_14], q in 2..12, activations FP16; NSGA-II with
40 individuals, SBX (p=0.9, eta=15), polynomial mutation (eta=20).

Differences from EMOMC's reference optimiser (documented, not hidden):
* the engine evaluates `population` offspring per generation (EMOMC: 20 offspring
  from 40 parents); `generations: 60` gives EMOMC's evaluation budget
  (40 + 120 x 20 = 2440 = 40 + 60 x 40);
* duplicates: the archive keeps distinct configurations, but offspring identical to a
  parent are evaluated again (pymoo regenerates them instead).

Variants: ``emomc_vgg16_cifar.py:size,nemo,checkpoint=vgg.msgpack,data_dir=/data/cifar10,
library=runs/lib`` (tokens as in emomc_default.py). All objectives are minimised (accuracy
enters as top-1 error).
"""

from nemo_jax import parse_config_variant

KEEP_RATIOS = [round(0.20 + 0.01 * i, 2) for i in range(61)]      # 0.20 .. 0.80
PATHS = {"library": "runs/emomc_library_vgg16", "checkpoint": "vgg16_cifar.msgpack",
         "data_dir": "cifar10"}
# VGG-16 at 32x32x3 (`nemo-jax costs vgg16_cifar --input-shape 32,32,3 --uniform 32,32`):
# FP32 weights are 57,483 KB (normal coding) and 1304.5 (0.01 mJ, X|Y). EMOMC reports
# 7.4x (CSR) / 14.0x (X|Y) at 0.3% loss: the bounds ask for >= 6x smaller storage
# (mode "energy") / >= 8x less energy (mode "size").
SIZE_BOUND_KB = 9580.0
ENERGY_BOUND = 163.0


def _variant(arg, **choices):
  defaults = {**PATHS, **{k: v[0] for k, v in choices.items()}}
  return parse_config_variant(arg, choices, defaults, keys=tuple(PATHS))


def get_library_config(arg=None):
  v = _variant(arg)
  return {
      "model": "vgg16_cifar",
      "checkpoint": v["checkpoint"],
      "dataset": "cifar10",
      "data_dir": v["data_dir"],
      "out_dir": v["library"],
      "keep_range": "0.2:0.8:0.01",
      "schedule": "independent",
      "steps": 32,
      "epochs_per_step": 1.0,
      "batch_size": 128,
      "learning_rate": 0.01,
      "seed": 0,
  }


def get_config(arg=None):
  v = _variant(arg, mode=("energy", "size"), optimizer=("nsga2", "nemo"))
  mode, optimizer = v["mode"], v["optimizer"]
  if mode == "energy":
    objectives, constraints = ["top1_error", "energy:X|Y"], {"size_kb:csr": SIZE_BOUND_KB}
  else:
    objectives, constraints = ["top1_error", "size_kb:csr"], {"energy:X|Y": ENERGY_BOUND}
  if optimizer == "nemo":
    species = [{"kind": "direct_round"}, {"kind": "direct_floor"},
               {"kind": "gcn"}, {"kind": "graph_unet"}]
    selection, resize = "nsga3", True
  else:
    species = [{"kind": "direct_round", "sbx_prob": 0.9, "sbx_eta": 15.0, "pm_eta": 20.0}]
    selection, resize = "nsga2", False
  return {
      "problem": {
          "model": "vgg16_cifar",
          "input_shape": [32, 32, 3],
          "num_classes": 10,
          "checkpoint": v["checkpoint"],
          "dataset": "cifar10",
          "data_dir": v["data_dir"],
          "library": v["library"],
          "eval_split": "train",
          "eval_per_class": 100,
          "objectives": objectives,
          "constraints": constraints,
          "bit_choices": list(range(2, 13)),
          "quantize_activations": False,
          "quant": {"activation_format": "fp16", "weight_quant": "symmetric_per_tensor"},
          "keep_choices": KEEP_RATIOS,
          "eval_batch_size": 500,
      },
      "search": {
          "population": 40,
          "generations": 60,
          "species": species,
          "selection": selection,
          "resize": resize,
          "min_species_size": 4,
          "seed": 0,
      },
      "run": {
          "selection_per_class": 200,    # picks the table's members (emomc/report.py)
          "final_split": "test",
          "final_max_images": 10000,
      },
  }
