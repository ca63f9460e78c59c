"""Quantization-aware CIFAR VGG-16 as in EMOMC's reference code (``models/VGG.py``).

13 conv3x3 (padding 1, WITH bias, as EMOMC's ``nn.Conv2d`` default) -> BN -> ReLU
layers with channels ``64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512,M``
(``M``: 2x2 max-pool, stride 2), then one linear layer 512 -> classes. At 32x32 input
the last pool leaves 1x1x512, exactly EMOMC's network (14,728,266 params for 3
channels and 10 classes).

Other input sizes (documented deviation, EMOMC only runs 32x32):
* a pool whose input is already 1 pixel wide in a dimension leaves that dimension
  alone (window ``min(2, size)``), so e.g. 28x28 goes 14, 7, 3, 1, 1 instead of
  failing;
* the features are globally average-pooled before the classifier, which is the
  identity (EMOMC's flatten) when the spatial size is 1x1 and keeps the classifier at
  512 inputs for larger images.

Layer order (= quantizer index): ``conv0 .. conv12``, then ``classifier``: 14 layers.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemo_jax._src.layers import QConv, QDense, quantize_activation
from nemo_jax._src.models.resnet import batch_norm

ModuleDef = Any

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M")


def _max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max-pool (floor mode); a 1-pixel dimension is left unpooled."""
  wh, ww = min(2, x.shape[1]), min(2, x.shape[2])
  return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max,
                               (1, wh, ww, 1), (1, wh, ww, 1), "VALID")


class VGG(nn.Module):
  """CIFAR VGG: conv3x3+BN+ReLU stacks and max-pools from ``cfg``, one linear layer.

  Attributes:
    cfg: channels per conv, ``"M"`` for a max-pool.
    num_classes: logits.
    conv_bias: biases on the convs (EMOMC: True).
    conv, dense, norm: injectable layer classes (quantized by default).
    act: activation.
  """
  cfg: Sequence[Any] = VGG16_CFG
  num_classes: int = 10
  conv_bias: bool = True
  conv: ModuleDef = QConv
  dense: ModuleDef = QDense
  norm: ModuleDef = nn.BatchNorm
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x, ctx=None, train: bool = False):
    """Logits ``[N, num_classes]`` for NHWC float images ``x``; ``ctx=None``: float."""
    norm = batch_norm(train, self.norm)
    index = 0
    for item in self.cfg:
      if item == "M":
        x = _max_pool_2x2(quantize_activation(x, ctx, "pool", f"pool{index}"))
        continue
      x = self.conv(item, 3, 1, padding=1, use_bias=self.conv_bias,
                    name=f"conv{index}")(x, ctx)
      x = self.act(norm(name=f"bn{index}")(x))
      index += 1
    x = jnp.mean(x, axis=(1, 2))
    return self.dense(self.num_classes, name="classifier")(x, ctx)


def vgg16_cifar(input_shape, num_classes, **kwargs) -> nn.Module:
  """EMOMC's CIFAR VGG-16 (see module docstring for non-32x32 inputs)."""
  del input_shape
  return VGG(cfg=VGG16_CFG, num_classes=num_classes, **kwargs)
