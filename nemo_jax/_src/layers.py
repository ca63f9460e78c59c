"""Quantization-aware Flax (linen) layers and the per-call quantization context.

A model's ``__call__(x, ctx=None, train=False)`` threads a :class:`QContext` through
every :class:`QConv` / :class:`QDense`. Each quantized layer takes the next index in
execution order from the context and reads its weight bit-width, input-activation
bit-width and keep ratio from the context's (traced) config arrays. So:

* layer ``i`` (0-based, execution order) has weight quantizer ``w_bits[i]``;
* activation quantizers are numbered in the order the trace creates them, and where
  they sit is the context's ``placement`` (``PLACEMENTS``):

  - ``"conv_inputs"``: one quantizer on the input of every conv/dense layer, so
    activation quantizer ``i`` is layer ``i``'s input and ``len(a_bits) == len(w_bits)``;
  - ``"nncf"`` (NNCF's default placement): one quantizer per TENSOR, shared by all the
    layers that read it (a ResNet block input feeds ``conv1`` and ``downsample_conv``),
    plus quantizers on both inputs of every residual add and on every max-pool input
    (models mark these with :func:`quantize_activation`). MobileNet-V2 / ResNet-50 /
    ResNeXt-101-32x8d get 116 / 125 / 244 quantizers, as in the NEMO paper.

  Tensors are matched by object identity inside one trace: the same value passed to
  two quantized layers (or to a layer and an add) is quantized once.
* the config is data, not structure: one compiled function serves every config and a
  population of configs can be ``vmap``-ed / ``lax.map``-ed over the same params.

``ctx=None`` (or ``QContext()``) runs the plain float model.

BatchNorm is NOT folded into the conv weights before quantization: weights are
quantized as stored (like NNCF's default and EMOMC's reference code), BatchNorm runs
in float after the (fake-quantized) conv. This keeps the float parameters the search
evaluates identical to the trained/converted checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax._src import quant

Array = jax.Array

PLACEMENTS = ("conv_inputs", "nncf")
"""Where activation quantizers sit (module docstring)."""

SITE_KINDS = ("input", "residual", "pool")
"""Why an activation quantizer exists: a layer reads it, a residual add, a max-pool."""


@dataclasses.dataclass(frozen=True)
class ActInfo:
  """Static description of one activation quantizer, recorded while tracing a model."""
  index: int
  kind: str                 # one of SITE_KINDS
  name: str                 # e.g. "layer1_0/conv1:input" or "layer1_0:residual"
  elems: int                # elements of the quantized tensor, per image
  shape: tuple[int, ...]    # its shape for one image


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """Static description of one quantized layer, recorded while tracing a model."""
  index: int
  name: str                 # module path, e.g. "layer1_0/conv1"
  op: str                   # "conv", "depthwise" or "dense"
  in_channels: int
  out_channels: int
  groups: int
  kernel_size: tuple[int, int]
  stride: tuple[int, int]
  in_hw: tuple[int, int]    # input feature map (1, 1 for dense)
  out_hw: tuple[int, int]
  params: int               # weights + bias
  weights: int              # weights only (what is quantized / pruned)
  macs: int                 # per image
  input_quantizer: int = -1  # the activation quantizer this layer reads


class QContext:
  """Carries one configuration through a model call (not a pytree; build it inside jit).

  A context is two functions the quantized layers call, ``quantize_input(x, i)`` on the
  input of layer ``i`` and ``quantize_kernel(kernel, i)`` on its kernel, plus an optional
  ``on_layer(LayerInfo)`` callback (tracing). The keyword arguments build the standard
  functions from a configuration; ``quantize_input`` / ``quantize_kernel`` replace them
  (injection instead of subclassing: a quantization scheme hands in precomputed
  kernels, the workload tracer a marker, calibration an observer).

  Args:
    w_bits: int array ``[L]`` of weight bit-widths (``>= 32``: float), or None (float).
    a_bits: int array ``[La]`` of activation bit-widths (one per activation quantizer,
      ``placement`` decides how many), or None (float).
    keep: keep ratio, scalar or ``[L]`` (None: no pruning).
    act_ranges: ``(lo[La], hi[La])`` calibrated activation ranges; None uses the
      current batch's min/max (dynamic quantization, useful for QAT).
    prune_ranks: optional tuple of precomputed ``quant.magnitude_ranks`` per layer.
    weight_quant: weight quantizer mode (``quant.WEIGHT_MODES``).
    weight_range: its integer range (``quant.WEIGHT_RANGES``; None: the mode's own).
    activation_format: ``quant.ACTIVATION_FORMATS``: ``"int"`` (uniform affine at
      ``a_bits``), ``"fp16"`` (inputs rounded to float16 unless ``a_bits >= 32``) or
      ``"float32"`` (inputs untouched).
    observe: if True, each layer records the (min, max) of its input in
      ``self.observed`` (calibration).
    placement: one of :data:`PLACEMENTS`.
    on_layer: optional callback receiving a :class:`LayerInfo` per layer (tracing).
    on_activation: optional callback receiving an :class:`ActInfo` per activation
      quantizer, and ``on_output(y, i) -> y`` on every layer's output (tracing).
    quantize_input: ``(x, q) -> x`` replacing activation quantizer ``q``.
    quantize_kernel: ``(kernel, i) -> kernel`` replacing pruning + weight quantization.
  """

  def __init__(self, w_bits=None, a_bits=None, keep=None, act_ranges=None,
               prune_ranks=None, weight_quant="symmetric_per_channel",
               activation_format="int", observe=False, placement="conv_inputs",
               on_layer: Callable[[LayerInfo], Any] | None = None,
               on_activation: Callable[[ActInfo], Any] | None = None,
               on_output: Callable | None = None,
               quantize_input: Callable | None = None,
               quantize_kernel: Callable | None = None, weight_range=None):
    self.weight_range = quant.resolve_weight_quantizer(weight_quant, weight_range)
    if activation_format not in quant.ACTIVATION_FORMATS:
      raise ValueError(f"activation_format={activation_format!r} is invalid; allowed: "
                       f"{quant.ACTIVATION_FORMATS}")
    self.w_bits = w_bits
    self.a_bits = a_bits
    self.keep = keep
    self.act_ranges = act_ranges
    self.prune_ranks = prune_ranks
    self.weight_quant = weight_quant
    self.activation_format = activation_format
    if placement not in PLACEMENTS:
      raise ValueError(f"placement={placement!r} is invalid; allowed: {PLACEMENTS}")
    self.observe = observe
    self.placement = placement
    self.on_layer = on_layer
    self.on_activation = on_activation
    self.on_output = on_output
    self._input_fn = quantize_input or self._default_input
    self._kernel_fn = quantize_kernel or self._default_kernel
    self.observed: list[tuple[Array, Array]] = []
    self.num_layers = 0
    self.num_activations = 0
    self.layer_inputs: list[int] = []   # activation quantizer read by layer i
    # id(tensor) -> (tensor, quantizer index, quantized tensor): a tensor is quantized
    # once per trace (nncf). The tensor is kept so its id cannot be reused meanwhile.
    self._quantized: dict[int, tuple[Any, int, Any]] = {}

  @classmethod
  def from_config(cls, config, calibration=None, **kwargs):
    """Context for a ``QuantConfig`` (one member, no population axis)."""
    ranges = None if calibration is None else (calibration.lo, calibration.hi)
    return cls(w_bits=config.w_bits, a_bits=config.a_bits, keep=config.keep,
               act_ranges=ranges, **kwargs)

  def next_index(self) -> int:
    i = self.num_layers
    self.num_layers += 1
    return i

  @staticmethod
  def _pick(values, i):
    if values is None:
      return None
    values = jnp.asarray(values)
    return values if values.ndim == 0 else values[i]

  def quantize_input(self, x, i, name: str = ""):
    """The (quantized) input of layer ``i``; records which quantizer it reads."""
    if self.placement == "conv_inputs":
      q, xq = self._new_quantizer(x, "input", name, index=i)
    else:
      q, xq = self.quantize_tensor(x, "input", name)
    self.layer_inputs.append(q)
    return xq

  def quantize_tensor(self, x, kind: str, name: str = ""):
    """``(quantizer index, quantized x)``, sharing one quantizer per tensor."""
    hit = self._quantized.get(id(x))
    if hit is not None and hit[0] is x:
      return hit[1], hit[2]
    q, xq = self._new_quantizer(x, kind, name)
    self._quantized[id(x)] = (x, q, xq)
    return q, xq

  def _new_quantizer(self, x, kind, name, index=None):
    q = self.num_activations if index is None else index
    self.num_activations = max(self.num_activations, q + 1)
    if self.observe:
      self.observed.append((jnp.min(x), jnp.max(x)))
    if self.on_activation is not None:
      shape = tuple(x.shape[1:])
      self.on_activation(ActInfo(index=q, kind=kind, name=name,
                                 elems=int(np.prod(shape, dtype=np.int64)), shape=shape))
    return q, self._input_fn(x, q)

  def output(self, y, i):
    """Layer ``i``'s output (a tracing hook; the identity otherwise)."""
    return y if self.on_output is None else self.on_output(y, i)

  def quantize_kernel(self, kernel, i):
    return self._kernel_fn(kernel, i)

  def _default_input(self, x, i):
    bits = self._pick(self.a_bits, i)
    if self.activation_format == "float32":
      return x
    if self.activation_format == "fp16":
      return quant.round_fp16(x, bits)
    if bits is None:
      return x
    if self.act_ranges is None:
      lo, hi = jax.lax.stop_gradient(jnp.min(x)), jax.lax.stop_gradient(jnp.max(x))
    else:
      lo, hi = self.act_ranges[0][i], self.act_ranges[1][i]
    return quant.quantize_affine(x, bits, lo, hi)

  def _default_kernel(self, kernel, i):
    keep = self._pick(self.keep, i)
    if keep is not None:
      ranks = None if self.prune_ranks is None else self.prune_ranks[i]
      kernel = quant.prune(kernel, keep, ranks)
    bits = self._pick(self.w_bits, i)
    if bits is None:
      return kernel
    return quant.quantize_weight(kernel, bits, self.weight_quant, self.weight_range)


def quantize_activation(x, ctx: QContext | None, kind: str, name: str = ""):
  """An activation quantizer at a non-layer site (residual add input, max-pool input).

  Only the ``"nncf"`` placement quantizes here; ``ctx=None`` and ``"conv_inputs"``
  return ``x`` unchanged.
  """
  if ctx is None or ctx.placement != "nncf":
    return x
  return ctx.quantize_tensor(x, kind, name)[1]


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def _module_path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


class QConv(nn.Module):
  """2-D convolution (NHWC, HWIO kernel) with weight / input quantization and pruning.

  Padding is explicit and symmetric (``padding=k//2`` per side by default), like
  torchvision: Flax's "SAME" pads stride-2 convs asymmetrically on even inputs.
  """
  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: int | Sequence[int] | None = None
  feature_group_count: int = 1
  use_bias: bool = False
  kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array, ctx: QContext | None = None) -> Array:
    kh, kw = _pair(self.kernel_size)
    sh, sw = _pair(self.strides)
    ph, pw = _pair(self.padding) if self.padding is not None else (kh // 2, kw // 2)
    cin = x.shape[-1]
    if cin % self.feature_group_count:
      raise ValueError(f"{_module_path(self)}: in_channels={cin} not divisible by "
                       f"groups={self.feature_group_count}")
    kernel = self.param("kernel", self.kernel_init,
                        (kh, kw, cin // self.feature_group_count, self.features))
    bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
    if ctx is not None:
      i = ctx.next_index()
      x = ctx.quantize_input(x, i, f"{_module_path(self)}:input")
      kernel = ctx.quantize_kernel(kernel, i)
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (sh, sw), ((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=self.feature_group_count)
    if bias is not None:
      y = y + bias
    if ctx is not None:
      y = ctx.output(y, i)
    if ctx is not None and ctx.on_layer is not None:
      groups = self.feature_group_count
      op = "depthwise" if groups > 1 and groups == cin else "conv"
      oh, ow = y.shape[1], y.shape[2]
      weights = kh * kw * (cin // groups) * self.features
      ctx.on_layer(LayerInfo(
          index=i, name=_module_path(self), op=op, in_channels=cin,
          out_channels=self.features, groups=groups, kernel_size=(kh, kw),
          stride=(sh, sw), in_hw=(x.shape[1], x.shape[2]), out_hw=(oh, ow),
          params=weights + (self.features if self.use_bias else 0), weights=weights,
          macs=weights * oh * ow, input_quantizer=ctx.layer_inputs[i]))
    return y


class QDense(nn.Module):
  """Dense layer (kernel ``[in, out]``) with weight / input quantization and pruning."""
  features: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array, ctx: QContext | None = None) -> Array:
    cin = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (cin, self.features))
    bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
    if ctx is not None:
      i = ctx.next_index()
      x = ctx.quantize_input(x, i, f"{_module_path(self)}:input")
      kernel = ctx.quantize_kernel(kernel, i)
    y = x @ kernel.astype(x.dtype)
    if bias is not None:
      y = y + bias
    if ctx is not None:
      y = ctx.output(y, i)
    if ctx is not None and ctx.on_layer is not None:
      weights = cin * self.features
      ctx.on_layer(LayerInfo(
          index=i, name=_module_path(self), op="dense", in_channels=cin,
          out_channels=self.features, groups=1, kernel_size=(1, 1), stride=(1, 1),
          in_hw=(1, 1), out_hw=(1, 1),
          params=weights + (self.features if self.use_bias else 0), weights=weights,
          macs=weights, input_quantizer=ctx.layer_inputs[i]))
    return y
