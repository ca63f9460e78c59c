"""The second embedded problem: MobileNet-V2 (width 0.5) on the shipped Fashion-MNIST subset.

``mobilenet_v2_small`` (torchvision's inverted-residual blocks with a stride-1 stem,
590k parameters; trained by ``experiments/configs/train_mobilenet.py`` on the embedded
training images minus the held-out part) with NNCF's quantizer placement: one activation
quantizer per quantized tensor, shared by every consumer (116 searched quantizers: 53
weight, 63 activation). Trained 10 epochs it loses little under uniform W4A4 (88.0% on
500 test images against 87.6% float on 2,000); its per-quantizer sensitivities
(``nemo-jax sensitivity --config experiments/configs/mobilenet.py``) and the comparison
in ``results/baselines_mobilenet/`` show what allocation buys on it.

Run: ``nemo-jax search --config experiments/configs/mobilenet.py --out runs/mobilenet``.
"""

import os

from nemo_jax import load_config_file


def get_config():
  d = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))
  d["problem"].update(model="mobilenet_v2_small")
  d["problem"]["quant"] = dict(d["problem"]["quant"], placement="nncf")
  return d
