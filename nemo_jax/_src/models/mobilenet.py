"""Quantization-aware MobileNet-V2 with torchvision's exact structure.

``torchvision.models.mobilenet_v2``: a 3x3 stride-2 stem (32 channels x width),
17 inverted-residual blocks from the ``(t, c, n, s)`` table below, a 1x1 conv to
``last_channel`` (1280 x max(1, width)), global average pool, and a linear
classifier. Channels are rounded with ``_make_divisible``; activations are ReLU6;
convs have no bias, the classifier has one. Dropout (p=0.2 in torchvision) sits
before the classifier and is omitted: it is the identity in eval mode, and training
here is short quantization-aware fine-tuning.

Layer order (= quantizer index): stem, then per block ``expand_conv`` (absent when
``t == 1``), ``dw_conv``, ``project_conv``, then the last 1x1 conv, then
``classifier``: 53 quantized layers at width 1.

Module names: ``features_0/{conv,bn}``, ``features_{i}/{expand,dw,project}_{conv,bn}``
(``i = 1..17``), ``features_18/{conv,bn}``, ``classifier`` -- torchvision's
``features.{i}`` indices.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from nemo_jax._src.layers import QConv, QDense
from nemo_jax._src.models.resnet import _residual_add, _scope_name, batch_norm

ModuleDef = Any

# (expansion t, output channels c, repeats n, first stride s), torchvision's table.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
  """Rounds ``v`` to a multiple of ``divisor``, never below 90% of ``v`` (torchvision)."""
  if min_value is None:
    min_value = divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


class ConvBNAct(nn.Module):
  """Conv -> BN -> activation (torchvision ``Conv2dNormActivation``, padding ``k//2``)."""
  features: int
  conv: ModuleDef
  norm: ModuleDef
  kernel_size: int = 3
  strides: int = 1
  groups: int = 1
  act: Callable | None = nn.relu6

  @nn.compact
  def __call__(self, x, ctx=None):
    x = self.conv(self.features, self.kernel_size, self.strides,
                  feature_group_count=self.groups, name="conv")(x, ctx)
    x = self.norm(name="bn")(x)
    return x if self.act is None else self.act(x)


class InvertedResidual(nn.Module):
  """Expand 1x1 (if t != 1) -> depthwise 3x3 -> linear 1x1 projection (+ residual)."""
  out_channels: int
  strides: int
  expand_ratio: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu6

  @nn.compact
  def __call__(self, x, ctx=None):
    in_channels = x.shape[-1]
    hidden = int(round(in_channels * self.expand_ratio))
    out = x
    if self.expand_ratio != 1:
      out = self.conv(hidden, 1, 1, name="expand_conv")(out, ctx)
      out = self.act(self.norm(name="expand_bn")(out))
    out = self.conv(hidden, 3, self.strides, feature_group_count=hidden,
                    name="dw_conv")(out, ctx)
    out = self.act(self.norm(name="dw_bn")(out))
    out = self.conv(self.out_channels, 1, 1, name="project_conv")(out, ctx)
    out = self.norm(name="project_bn")(out)
    if self.strides == 1 and in_channels == self.out_channels:
      out = _residual_add(out, x, ctx, _scope_name(self))
    return out


class MobileNetV2(nn.Module):
  """torchvision MobileNet-V2.

  Attributes:
    num_classes: logits.
    width_mult: channel multiplier.
    round_nearest: channel rounding (``_make_divisible``'s divisor; 1 disables it).
    inverted_residual_setting: ``(t, c, n, s)`` rows.
    stem_stride: the first conv's stride (torchvision: 2).
    last_channel: the last 1x1 conv's channels (None: torchvision's
      ``1280 x max(1, width_mult)``).
    conv, dense, norm: injectable layer classes (quantized by default).
    act: activation (ReLU6).
  """
  num_classes: int = 1000
  width_mult: float = 1.0
  round_nearest: int = 8
  inverted_residual_setting: Sequence[Sequence[int]] = INVERTED_RESIDUAL_SETTING
  stem_stride: int = 2
  last_channel: int | None = None
  conv: ModuleDef = QConv
  dense: ModuleDef = QDense
  norm: ModuleDef = nn.BatchNorm
  act: Callable = nn.relu6

  @nn.compact
  def __call__(self, x, ctx=None, train: bool = False):
    """Logits ``[N, num_classes]`` for NHWC float images ``x``; ``ctx=None``: float."""
    norm = batch_norm(train, self.norm)
    input_channel = _make_divisible(32 * self.width_mult, self.round_nearest)
    last_channel = self.last_channel or _make_divisible(1280 * max(1.0, self.width_mult),
                                                        self.round_nearest)
    x = ConvBNAct(input_channel, self.conv, norm, 3, self.stem_stride, act=self.act,
                  name="features_0")(x, ctx)
    index = 1
    for t, c, n, s in self.inverted_residual_setting:
      out_channels = _make_divisible(c * self.width_mult, self.round_nearest)
      for i in range(n):
        x = InvertedResidual(out_channels, s if i == 0 else 1, t, self.conv, norm,
                             self.act, name=f"features_{index}")(x, ctx)
        index += 1
    x = ConvBNAct(last_channel, self.conv, norm, 1, 1, act=self.act,
                  name=f"features_{index}")(x, ctx)
    x = jnp.mean(x, axis=(1, 2))
    return self.dense(self.num_classes, name="classifier")(x, ctx)


def mobilenet_v2(input_shape, num_classes, width_mult: float = 1.0, **kwargs) -> nn.Module:
  """torchvision MobileNet-V2 (3,504,872 params at width 1, 3 channels, 1000 classes).

  Any input size works (28x28 ends at 1x1 after the five stride-2 layers).
  """
  del input_shape
  if not isinstance(width_mult, (int, float)) or isinstance(width_mult, bool) or width_mult <= 0:
    raise ValueError(f"width_mult: {width_mult!r} is not a positive number")
  return MobileNetV2(num_classes=num_classes, width_mult=float(width_mult), **kwargs)


SMALL_INPUT_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
"""The ``(t, c, n, s)`` table for 28-32 px inputs (the common CIFAR variant: the second
stage keeps stride 1, and so does the stem), so the last blocks still see 4x4 maps."""


def mobilenet_v2_small(input_shape, num_classes, width_mult: float = 0.5,
                       last_channel: int = 640, **kwargs) -> nn.Module:
  """MobileNet-V2 for small images (28x28 / 32x32): stride-1 stem, :data:`SMALL_INPUT_SETTING`,
  width 0.5 and a 640-channel last conv by default (the embedded second problem,
  ``experiments/configs/mobilenet.py``).

  Same blocks and layer order as :func:`mobilenet_v2` (53 quantized layers).
  """
  del input_shape
  if not isinstance(width_mult, (int, float)) or isinstance(width_mult, bool) or width_mult <= 0:
    raise ValueError(f"width_mult: {width_mult!r} is not a positive number")
  return MobileNetV2(num_classes=num_classes, width_mult=float(width_mult), stem_stride=1,
                     inverted_residual_setting=SMALL_INPUT_SETTING,
                     last_channel=int(last_channel), **kwargs)
