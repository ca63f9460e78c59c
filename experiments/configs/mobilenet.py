"""The second embedded problem: MobileNet-V2 (width 0.5) on the shipped Fashion-MNIST subset.

``mobilenet_v2_small`` (torchvision's inverted-residual blocks with a stride-1 stem,
590k parameters; trained by ``experiments/configs/train_mobilenet.py`` on the embedded
training images minus the held-out part) with NNCF's quantizer placement: one activation
quantizer per quantized tensor, shared by every consumer (116 searched quantizers: 53
weight, 63 activation). Unlike resnet20, whose accuracy is flat from W8A8 down to about
W4A5, this network's depthwise layers and its linear bottleneck outputs lose much more
under uniform low precision, so where the bits go matters (``docs/DESIGN.md``, "Search
quality"; ``nemo-jax sensitivity --config experiments/configs/mobilenet.py``).

Run: ``nemo-jax search --config experiments/configs/mobilenet.py --out runs/mobilenet``.
"""

import os

from nemo_jax import load_config_file


def get_config():
  d = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))
  d["problem"].update(model="mobilenet_v2_small")
  d["problem"]["quant"] = dict(d["problem"]["quant"], placement="nncf")
  return d
