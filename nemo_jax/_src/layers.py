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

``ctx=None`` (or ``QContext()``) runs the plain float model;
``QContext.from_config(config, calibration, spec)`` the standard quantizers of one
configuration.

BatchNorm is NOT folded into the conv weights before quantization: weights are
quantized as stored (like NNCF's default and EMOMC's reference code), BatchNorm runs
in float after the (fake-quantized) conv. This keeps the float parameters the search
evaluates identical to the trained/converted checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax._src import quant
from nemo_jax._src.spec import NEMO, PLACEMENTS, QuantSpec

Array = jax.Array


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
  """The per-call hooks of one model call (not a pytree; build it inside jit).

  Quantized layers call ``quantize_input(x, q)`` on the tensor of activation quantizer
  ``q``, ``quantize_kernel(kernel, i)`` on layer ``i``'s kernel and ``on_output(y, i)`` on
  its output; tracing passes ``on_layer`` / ``on_activation`` callbacks. A context holds
  nothing else: what the hooks do is decided by whoever builds them (a quantization
  scheme hands in precomputed kernels, the workload tracer a recorder, calibration an
  observer, :meth:`from_config` the standard quantizers of one configuration).

  Args:
    quantize_input: ``(x, q) -> x`` for activation quantizer ``q`` (default: identity).
    quantize_kernel: ``(kernel, i) -> kernel`` for layer ``i`` (default: identity).
    on_output: ``(y, i) -> y`` on every layer's output (default: identity).
    on_layer: optional callback receiving a :class:`LayerInfo` per layer (tracing).
    on_activation: optional callback receiving an :class:`ActInfo` per activation
      quantizer (tracing).
    placement: where activation quantizers sit (:data:`PLACEMENTS`).
  """

  def __init__(self, quantize_input: Callable | None = None,
               quantize_kernel: Callable | None = None, on_output: Callable | None = None,
               on_layer: Callable[[LayerInfo], Any] | None = None,
               on_activation: Callable[[ActInfo], Any] | None = None,
               placement: str = "conv_inputs"):
    if placement not in PLACEMENTS:
      raise ValueError(f"placement={placement!r} is invalid; allowed: {PLACEMENTS}")
    self.placement = placement
    self.on_layer = on_layer
    self.on_activation = on_activation
    self.on_output = on_output
    self._input_fn = quantize_input
    self._kernel_fn = quantize_kernel
    self.num_layers = 0
    self.num_activations = 0
    self.layer_inputs: list[int] = []   # activation quantizer read by layer i
    # id(tensor) -> (tensor, quantizer index, quantized tensor): a tensor is quantized
    # once per trace (nncf). The tensor is kept so its id cannot be reused meanwhile.
    self._quantized: dict[int, tuple[Any, int, Any]] = {}

  @classmethod
  def from_config(cls, config, calibration=None, spec: QuantSpec = NEMO, prune_ranks=None,
                  **hooks) -> "QContext":
    """The standard quantizers of ONE configuration (no population axis).

    Args:
      config: a ``QuantConfig`` of one member (``w_bits [L]``, ``a_bits [La]``, ``keep``
        scalar or ``[L]``); a field that is None stays float (no pruning for ``keep``).
      calibration: activation ranges: a ``Calibration`` (``.lo`` / ``.hi``) or a pair
        ``(lo [La], hi [La])``; None uses each batch's own min / max (dynamic ranges,
        for quantization-aware training).
      spec: the quantizers (default: NEMO's, what a default search evaluates).
      prune_ranks: optional precomputed ``quant.magnitude_ranks`` per layer.
      **hooks: ``on_output`` / ``on_layer`` / ``on_activation``.
    """
    ranges = calibration
    if calibration is not None and hasattr(calibration, "lo"):
      ranges = (calibration.lo, calibration.hi)
    lo, hi = (None, None) if ranges is None else ranges
    return cls(quantize_input=input_quantizer(spec, config.a_bits, lo, hi),
               quantize_kernel=kernel_quantizer(spec, config.w_bits, config.keep, prune_ranks),
               placement=spec.placement, **hooks)

  def next_index(self) -> int:
    i = self.num_layers
    self.num_layers += 1
    return i

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
    if self.on_activation is not None:
      shape = tuple(x.shape[1:])
      self.on_activation(ActInfo(index=q, kind=kind, name=name,
                                 elems=int(np.prod(shape, dtype=np.int64)), shape=shape))
    return q, (x if self._input_fn is None else self._input_fn(x, q))

  def output(self, y, i):
    """Layer ``i``'s output (a tracing hook; the identity otherwise)."""
    return y if self.on_output is None else self.on_output(y, i)

  def quantize_kernel(self, kernel, i):
    return kernel if self._kernel_fn is None else self._kernel_fn(kernel, i)


def _pick(values, i):
  if values is None:
    return None
  values = jnp.asarray(values)
  return values if values.ndim == 0 else values[i]


def input_quantizer(spec: QuantSpec, a_bits, lo=None, hi=None) -> Callable:
  """``quantize_input(x, q)`` of one member: activation quantizer ``q`` at ``a_bits[q]``.

  Args:
    spec: the quantizers (``activation_format``, ``act_quant``).
    a_bits: int ``[La]`` bit-widths (``>= 32``: float), or None (float).
    lo, hi: float ``[La]`` calibrated ranges, or None: each batch's own min / max
      (gradients stopped), integer activations only.
  """
  fmt = spec.activation_format
  if fmt == "float32" or a_bits is None:
    return lambda x, q: x
  if fmt == "fp16":
    return lambda x, q: quant.round_fp16(x, a_bits[q])

  def quantize(x, q):
    if lo is None:
      l, h = jax.lax.stop_gradient(jnp.min(x)), jax.lax.stop_gradient(jnp.max(x))
    else:
      l, h = lo[q], hi[q]
    return quant.quantize_affine(x, a_bits[q], l, h, act_quant=spec.act_quant)

  return quantize


def kernel_quantizer(spec: QuantSpec, w_bits, keep=None, prune_ranks=None) -> Callable:
  """``quantize_kernel(kernel, i)`` of one member: magnitude pruning to ``keep`` (scalar
  or ``[L]``; None: none), then the weight quantizer at ``w_bits[i]`` (None: float)."""
  def quantize(kernel, i):
    k = _pick(keep, i)
    if k is not None:
      kernel = quant.prune(kernel, k, None if prune_ranks is None else prune_ranks[i])
    bits = _pick(w_bits, i)
    if bits is None:
      return kernel
    return quant.quantize_weight(kernel, bits, spec.weight_quant, spec.weight_range)

  return quantize


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


DEPTHWISE_IMPLS = ("auto", "conv", "shift")
_depthwise_impl = contextvars.ContextVar("depthwise_impl", default="auto")


@contextlib.contextmanager
def depthwise_impl(impl: str):
  """How depthwise convolutions are computed inside the block (traced code reads it).

  ``conv``: ``lax.conv_general_dilated`` with ``feature_group_count`` (cuDNN's kernels
  on GPU); ``shift``: a sum of the ``kh * kw`` shifted, strided input slices times the
  per-channel weights (:func:`depthwise_shift`; 5-14x faster forward and 6-10x faster
  forward + backward than the grouped convolution on XLA:CPU, same sums); ``auto`` (the
  default): ``shift`` on the CPU backend, ``conv`` elsewhere. ONNX export traces with
  ``conv``.
  """
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"impl={impl!r} is invalid; allowed: {DEPTHWISE_IMPLS}")
  token = _depthwise_impl.set(impl)
  try:
    yield
  finally:
    _depthwise_impl.reset(token)


def depthwise_shift(x, kernel, strides, padding):
  """A depthwise convolution (NHWC input, kernel ``[kh, kw, 1, C]``) as a sum of shifted,
  strided slices of the zero-padded input times the per-channel weights."""
  kh, kw = kernel.shape[:2]
  (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  oh = (xp.shape[1] - kh) // sh + 1
  ow = (xp.shape[2] - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      patch = jax.lax.slice(xp, (0, i, j, 0),
                            (xp.shape[0], i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1,
                             xp.shape[3]), (1, sh, sw, 1))
      term = patch * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _use_shift(groups: int, cin: int, features: int) -> bool:
  if not (groups > 1 and groups == cin == features):
    return False
  impl = _depthwise_impl.get()
  return impl == "shift" or (impl == "auto" and jax.default_backend() == "cpu")


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
    if _use_shift(self.feature_group_count, cin, self.features):
      y = depthwise_shift(x, kernel.astype(x.dtype), (sh, sw), ((ph, ph), (pw, pw)))
    else:
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
