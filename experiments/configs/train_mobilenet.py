"""The config that produced the shipped MobileNet-V2 checkpoint
(nemo_jax/assets/mobilenet_v2_small_fashion_mnist.*), the second embedded problem.

``mobilenet_v2_small`` (torchvision's blocks, stride-1 stem, width 0.5, 590k parameters)
trained from scratch on the embedded Fashion-MNIST training images minus the held-out
part (100 per class, the selection images of every search; ``docs/DESIGN.md``, "Image
sets"). Run:

  nemo-jax train --config experiments/configs/train_mobilenet.py \\
      --out nemo_jax/assets/mobilenet_v2_small_fashion_mnist.msgpack
"""


def get_config():
  return {
      "model": "mobilenet_v2_small",
      "dataset": "fashion_mnist_embedded",
      "held_out_per_class": 100,
      "epochs": 10,
      "batch_size": 128,
      "learning_rate": 0.1,
      "momentum": 0.9,
      "weight_decay": 4e-5,
      "augment": True,
      "seed": 0,
  }
