"""NEMO's ImageNet setup for resnet50 (paper section 4), to run on a GPU/TPU machine.

Needs the converted torchvision weights (`nemo-jax convert resnet50.pth --model resnet50
--out resnet50.msgpack`) and ImageNet-2012 in its usual layout under $IMAGENET_DIR
(train/<wnid>/*.JPEG, val/<wnid>/*.JPEG). Fitness: top-5 error on 5 training images per
class (5,000 images); final report: top-1 on the validation split.
"""

import os


def get_config():
  return {
      "model": "resnet50",
      "input_shape": [224, 224, 3],
      "num_classes": 1000,
      "checkpoint": os.environ.get("NEMO_CHECKPOINT", "resnet50.msgpack"),
      "dataset": "imagenet2012",
      "data_dir": os.environ.get("IMAGENET_DIR", "imagenet"),
      "eval_split": "train",
      "eval_per_class": 5,
      "calib_per_class": 1,
      "calib_batches": 10,
      "final_split": "validation",
      "final_max_images": 50000,
      "objectives": ["top5_error", "model_ratio", "bops_ratio"],
      "bit_choices": [2, 3, 4, 5, 6, 7, 8],
      "population": 64,
      "generations": 100,
      "species": [{"kind": "direct_round"}, {"kind": "direct_floor"},
                  {"kind": "gcn"}, {"kind": "graph_unet"}],
      "min_species_size": 8,
      "eval_batch_size": 250,
      "eval_strategy": "auto",
      "seed": 0,
  }
