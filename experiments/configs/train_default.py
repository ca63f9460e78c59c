"""The config that produced the shipped default checkpoint (nemo_jax/assets/resnet20_fashion_mnist.*).

Trained on the embedded training images minus the held-out part (100 per class, drawn
with ``held_out_seed``): searches draw their selection images from the held-out part
only (``docs/DESIGN.md``, "Image sets").

Run: nemo-jax train --config experiments/configs/train_default.py --out nemo_jax/assets/resnet20_fashion_mnist.msgpack
"""


def get_config():
  return {
      "model": "resnet20",
      "dataset": "fashion_mnist_embedded",   # 10,000 train / 2,000 test images shipped in the package
      "held_out_per_class": 100,             # 1,000 training images never trained on
      "epochs": 20,
      "batch_size": 128,
      "learning_rate": 0.1,
      "momentum": 0.9,
      "weight_decay": 5e-4,
      "augment": True,
      "seed": 0,
  }
