"""NEMO's ImageNet setups (paper section 4), to run on a GPU/TPU machine.

Select the network big_vision-style: ``--config experiments/configs/paper_imagenet.py:MODEL``
with MODEL in mobilenet_v2, resnet50, resnext101_32x8d (default resnet50); paths are
further tokens: ``paper_imagenet.py:resnet50,checkpoint=r50.msgpack,data_dir=/data/imagenet``.

Needs converted torchvision weights (``nemo-jax convert MODEL.pth --model MODEL --out
MODEL.msgpack``; default ``MODEL.msgpack``) and ImageNet-2012 in its usual layout
(train/<wnid>/*.JPEG, val/<wnid>/*.JPEG; default ./imagenet). Fitness:
top-5 error on 5 training images per class (5,000 images); the final front is re-evaluated
for top-1 on the validation split.
"""

from nemo_jax import parse_config_variant

PAPER_MODELS = ("mobilenet_v2", "resnet50", "resnext101_32x8d")


def get_config(arg=None):
  v = parse_config_variant(arg, {"model": PAPER_MODELS},
                           {"model": "resnet50", "data_dir": "imagenet"},
                           keys=("checkpoint", "data_dir"))
  model = v["model"]
  return {
      "problem": {
          "model": model,
          "input_shape": [224, 224, 3],
          "num_classes": 1000,
          "checkpoint": v.get("checkpoint", f"{model}.msgpack"),
          "dataset": "imagenet2012",
          "data_dir": v["data_dir"],
          "eval_split": "train",
          "eval_per_class": 5,
          "calib_per_class": 1,
          "calib_batches": 10,
          "objectives": ["top5_error", "model_ratio", "bops_ratio"],
          "bit_choices": [2, 3, 4, 5, 6, 7, 8],
          "quant": {
              "placement": "nncf",                      # one quantizer per tensor (NNCF)
              "weight_quant": "asymmetric_per_channel",  # NEMO: uniform affine weights ...
              "act_quant": "affine",                     # ... and activations (min/max)
          },
          "eval_batch_size": 250,
      },
      "search": {
          "population": 64,
          "generations": 100,
          "species": ["direct_round", "direct_floor", "gcn", "graph_unet"],
          "min_species_size": 8,
          "seed": 0,
      },
      "run": {
          "selection_per_class": 10,     # 10,000 held-out training images
          "final_split": "validation",
          "final_max_images": 50000,
      },
  }
