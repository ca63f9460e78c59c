"""A seconds-long smoke run of the whole pipeline (used by the tests)."""


def get_config():
  return {
      "problem": {
          "model": "resnet20",
          "checkpoint": "default",
          "dataset": "fashion_mnist_embedded",
          "eval_per_class": 2,
          "calib_per_class": 2,
          "calib_batches": 2,
          "objectives": ["top1_error", "model_ratio", "bops_ratio"],
      },
      "search": {
          "population": 8,
          "generations": 2,
          "species": [{"kind": "direct_round"}, {"kind": "direct_floor"},
                      {"kind": "gcn", "hidden": 8}, {"kind": "graph_unet", "hidden": 8}],
          "edges": "dataflow",
          "min_species_size": 2,
          "archive_size": 64,
          "seed": 0,
      },
      "run": {
          "selection_per_class": 4,
          "final_split": "test",
          "final_max_images": 40,
      },
  }
