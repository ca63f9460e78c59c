"""The embedded default search (what `nemo-jax search` runs with no --config).

resnet20 on the shipped Fashion-MNIST subset, NEMO's four species, objectives
(top-1 error, model ratio, BOPs ratio), all minimised. Weights are uniform affine per
output channel, as NEMO's specification quantizes them (``docs/DESIGN.md``, "Quantizer
schemes and calibration": uniform W4A4 89.55% test top-1 against 67.95% with the
symmetric narrow-range quantizer).

Sections (``nemo_jax.SearchConfig``): ``problem`` (what is optimised), ``search`` (how),
``run`` (what is reported after the loop); fields left out take their defaults.
"""


def get_config():
  return {
      "problem": {
          "model": "resnet20",
          "checkpoint": "default",
          "dataset": "fashion_mnist_embedded",
          "eval_split": "train",
          "eval_per_class": 25,
          "objectives": ["top1_error", "model_ratio", "bops_ratio"],
          "bit_choices": [2, 3, 4, 5, 6, 7, 8],
          "quant": {"weight_quant": "asymmetric_per_channel", "act_quant": "affine",
                    "calibration": "minmax"},
      },
      "search": {
          "population": 32,
          "generations": 25,
          "species": [
              {"kind": "direct_round"},
              {"kind": "direct_floor"},
              {"kind": "gcn"},
              {"kind": "graph_unet"},
          ],
          "selection": "nsga3",
          "utility": "r2",
          "min_species_size": 4,
          "seed": 0,
      },
      "run": {
          "selection_per_class": 50,
          "final_split": "test",
          "final_max_images": 2000,
      },
  }
