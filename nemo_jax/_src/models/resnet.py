"""Quantization-aware ResNets: torchvision's ImageNet family and the CIFAR ResNet-20.

Structure follows torchvision (``torchvision.models.resnet``) exactly so that its
checkpoints convert one-to-one (``nemo_jax._src.convert``):

* stem: 7x7 conv, stride 2, padding 3 -> BN -> ReLU -> 3x3 max-pool, stride 2, padding 1
  (padding with -inf, like ``torch.nn.MaxPool2d``);
* ``BasicBlock`` (ResNet-18/34) and ``Bottleneck`` (ResNet-50/101, ResNeXt) with the
  stride on the 3x3 conv ("ResNet v1.5") and ``groups`` / ``width_per_group``;
* a 1x1 conv + BN "downsample" on the shortcut whenever the shape changes;
* global average pool -> fully connected layer (with bias; convs have none).

Layer order (= quantizer index, see ``layers.py``): stem conv, then per block
``conv1, conv2, (conv3), downsample_conv`` -- the downsample comes LAST in its block
because torchvision's ``forward`` computes it after the main path -- then ``fc``.

Module names mirror torchvision's: ``conv1``, ``bn1``, ``layer{s}_{b}/conv1``,
``layer{s}_{b}/downsample_conv`` (torch ``layer{s}.{b}.downsample.0``),
``layer{s}_{b}/downsample_bn`` (``...downsample.1``), ``fc``.

``ResNet20`` is the CIFAR ResNet of He et al. (2016, sec. 4.2): 3x3 stem with 16
channels (no max-pool), three stages of three ``BasicBlock``s with 16/32/64 channels,
and option-B shortcuts (1x1 conv + BN) where the shape changes.

BatchNorm is ``flax.linen.BatchNorm(momentum=0.9, epsilon=1e-5)``, i.e. torch's
``momentum=0.1, eps=1e-5``; in eval mode (``train=False``) it is identical to
torch's. In train mode Flax updates the running variance with the biased batch
variance where torch uses the unbiased one (a factor n/(n-1), negligible for the
batch sizes used for fine-tuning).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemo_jax._src.layers import QConv, QDense, quantize_activation

ModuleDef = Any


def batch_norm(train: bool, norm: ModuleDef = nn.BatchNorm, **kwargs) -> ModuleDef:
  """BatchNorm constructor with torch's hyper-parameters (momentum 0.1, eps 1e-5).

  Args:
    train: if True, normalise with batch statistics and update the running ones.
    norm: the normalisation module class to wrap.
    **kwargs: overrides.

  Returns:
    A partial of ``norm`` taking ``name=...``.
  """
  defaults = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                  use_fast_variance=False)
  defaults.update(kwargs)
  return functools.partial(norm, **defaults)


def max_pool_torch(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
  """``torch.nn.MaxPool2d(window, stride, padding)`` on NHWC (pads with -inf, floor mode).

  Args:
    x: ``[N, H, W, C]`` input.
    window: square window size.
    stride: stride.
    padding: symmetric padding per side.

  Returns:
    Pooled ``[N, H', W', C]``.
  """
  return jax.lax.reduce_window(
      x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, window, window, 1),
      (1, stride, stride, 1), ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _scope_name(module) -> str:
  return "/".join(str(p) for p in module.path)


def _residual_add(out, identity, ctx, name: str):
  """``out + identity``, both inputs quantized under the ``"nncf"`` placement (the
  identity shares the block input's quantizer when it is the block input itself)."""
  out = quantize_activation(out, ctx, "residual", f"{name}:residual")
  identity = quantize_activation(identity, ctx, "residual", f"{name}:identity")
  return out + identity


class BasicBlock(nn.Module):
  """Two 3x3 convs (torchvision ``BasicBlock``, expansion 1).

  Attributes:
    planes: output channels.
    strides: stride of the first 3x3 conv.
    conv, norm: layer constructors (``norm`` already bound to train/eval mode).
    act: activation.
    groups, base_width: must be 1 / 64 (as torchvision requires).
  """
  planes: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: int = 1
  groups: int = 1
  base_width: int = 64
  expansion = 1

  @nn.compact
  def __call__(self, x, ctx=None):
    if self.groups != 1 or self.base_width != 64:
      raise ValueError(f"BasicBlock: groups={self.groups}, base_width={self.base_width}; "
                       "allowed: groups=1, base_width=64")
    out = self.conv(self.planes, 3, self.strides, name="conv1")(x, ctx)
    out = self.act(self.norm(name="bn1")(out))
    out = self.conv(self.planes, 3, 1, name="conv2")(out, ctx)
    out = self.norm(name="bn2")(out)
    identity = x
    if self.strides != 1 or x.shape[-1] != self.planes:
      # Computed after the main path, as in torchvision's forward (layer order).
      identity = self.conv(self.planes, 1, self.strides, name="downsample_conv")(x, ctx)
      identity = self.norm(name="downsample_bn")(identity)
    return self.act(_residual_add(out, identity, ctx, _scope_name(self)))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, groups) -> 1x1 x4 (torchvision ``Bottleneck``, v1.5).

  Attributes: as :class:`BasicBlock`; the inner width is
  ``int(planes * base_width / 64) * groups``, the output ``4 * planes``.
  """
  planes: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: int = 1
  groups: int = 1
  base_width: int = 64
  expansion = 4

  @nn.compact
  def __call__(self, x, ctx=None):
    width = int(self.planes * (self.base_width / 64.0)) * self.groups
    out_channels = self.planes * self.expansion
    out = self.conv(width, 1, 1, name="conv1")(x, ctx)
    out = self.act(self.norm(name="bn1")(out))
    out = self.conv(width, 3, self.strides, feature_group_count=self.groups,
                    name="conv2")(out, ctx)
    out = self.act(self.norm(name="bn2")(out))
    out = self.conv(out_channels, 1, 1, name="conv3")(out, ctx)
    out = self.norm(name="bn3")(out)
    identity = x
    if self.strides != 1 or x.shape[-1] != out_channels:
      identity = self.conv(out_channels, 1, self.strides, name="downsample_conv")(x, ctx)
      identity = self.norm(name="downsample_bn")(identity)
    return self.act(_residual_add(out, identity, ctx, _scope_name(self)))


class ResNet(nn.Module):
  """torchvision ResNet / ResNeXt (ImageNet stem) or, with ``cifar_stem``, CIFAR ResNet.

  Attributes:
    stage_sizes: blocks per stage.
    block_cls: :class:`BasicBlock` or :class:`Bottleneck`.
    num_classes: logits.
    stage_planes: ``planes`` per stage (torchvision: 64, 128, 256, 512).
    stem_features: channels of the stem conv.
    cifar_stem: 3x3 stride-1 stem without max-pool (He et al.'s CIFAR ResNets).
    groups, width_per_group: ResNeXt cardinality and per-group width.
    conv, dense, norm: injectable layer classes (quantized by default).
    act: activation.
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int = 1000
  stage_planes: Sequence[int] = (64, 128, 256, 512)
  stem_features: int = 64
  cifar_stem: bool = False
  groups: int = 1
  width_per_group: int = 64
  conv: ModuleDef = QConv
  dense: ModuleDef = QDense
  norm: ModuleDef = nn.BatchNorm
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x, ctx=None, train: bool = False):
    """Logits ``[N, num_classes]`` for NHWC float images ``x``; ``ctx=None``: float."""
    norm = batch_norm(train, self.norm)
    if self.cifar_stem:
      x = self.conv(self.stem_features, 3, 1, name="conv1")(x, ctx)
      x = self.act(norm(name="bn1")(x))
    else:
      x = self.conv(self.stem_features, 7, 2, padding=3, name="conv1")(x, ctx)
      x = self.act(norm(name="bn1")(x))
      x = max_pool_torch(quantize_activation(x, ctx, "pool", "maxpool"), 3, 2, 1)
    for s, (num_blocks, planes) in enumerate(zip(self.stage_sizes, self.stage_planes)):
      for b in range(num_blocks):
        strides = 2 if s > 0 and b == 0 else 1
        x = self.block_cls(planes=planes, strides=strides, conv=self.conv, norm=norm,
                           act=self.act, groups=self.groups,
                           base_width=self.width_per_group,
                           name=f"layer{s + 1}_{b}")(x, ctx)
    x = jnp.mean(x, axis=(1, 2))
    return self.dense(self.num_classes, name="fc")(x, ctx)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNeXt101_32x8d = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3),
                                     block_cls=Bottleneck, groups=32, width_per_group=8)
ResNet20 = functools.partial(ResNet, stage_sizes=(3, 3, 3), block_cls=BasicBlock,
                             stage_planes=(16, 32, 64), stem_features=16, cifar_stem=True)


def resnet18(input_shape, num_classes, **kwargs) -> nn.Module:
  """torchvision ResNet-18 (11,689,512 params at 3 channels, 1000 classes)."""
  del input_shape  # any H, W >= 1 works: every stage keeps at least 1x1
  return ResNet18(num_classes=num_classes, **kwargs)


def resnet50(input_shape, num_classes, **kwargs) -> nn.Module:
  """torchvision ResNet-50 v1.5 (25,557,032 params at 3 channels, 1000 classes)."""
  del input_shape
  return ResNet50(num_classes=num_classes, **kwargs)


def resnext101_32x8d(input_shape, num_classes, **kwargs) -> nn.Module:
  """torchvision ResNeXt-101 32x8d (88,791,336 params at 3 channels, 1000 classes)."""
  del input_shape
  return ResNeXt101_32x8d(num_classes=num_classes, **kwargs)


def resnet20(input_shape, num_classes, **kwargs) -> nn.Module:
  """CIFAR ResNet-20 with option-B shortcuts (~272k params at 3 channels, 10 classes)."""
  del input_shape
  return ResNet20(num_classes=num_classes, **kwargs)
