"""Fake quantizers and magnitude pruning, with bit-widths and keep ratios as traced arrays.

Every function here takes its bit-width / keep ratio as a JAX array (or anything
convertible), never as a Python constant, so one compiled function serves every
configuration. A bit-width of ``FLOAT_BITS`` (32) or more means float pass-through.

Gradients use the straight-through estimator (STE): the forward pass is the quantized
value, the backward pass is the identity (weights) or the identity masked to the
quantization range (activations, "clipped STE"), so the same code serves
quantization-aware fine-tuning.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FLOAT_BITS = 32
"""Sentinel bit-width meaning "leave this tensor in float" (any value >= 32 does)."""

MIN_BITS = 1
MAX_BITS = 32

WEIGHT_MODES = ("symmetric_per_channel", "symmetric_per_tensor",
                "asymmetric_per_channel", "asymmetric_per_tensor")

WEIGHT_RANGES = ("narrow", "full")
"""Integer range of a weight quantizer (``docs/DESIGN.md``, "Quantizer schemes and
calibration"). Symmetric: ``narrow`` = ``[-(2^(b-1)-1), 2^(b-1)-1]`` with
``step = max|w| / (2^(b-1)-1)`` (EMOMC), ``full`` = ``[-2^(b-1), 2^(b-1)-1]`` with
``step = 2 max|w| / (2^b - 1)`` (PyTorch's symmetric observer: all ``2^b`` levels).
Asymmetric: ``full`` = ``[0, 2^b - 1]``, ``narrow`` = ``[0, 2^b - 2]``. ``None`` means the
mode's own: ``narrow`` for symmetric, ``full`` for asymmetric."""

ACT_QUANTS = ("affine", "symmetric")
"""Integer activation quantizer: ``affine`` (uniform affine over the calibrated range
widened to contain 0, ``q`` in ``[0, 2^b - 1]``: NEMO's spec) or ``symmetric`` (zero point
fixed: unsigned ``[0, 2^b - 1]`` with ``scale = hi / (2^b - 1)`` when the range has no
negative part, else signed ``[-2^(b-1), 2^(b-1)-1]`` with ``scale = 2 max(|lo|, hi) /
(2^b - 1)``, written as codes ``[0, 2^b - 1]`` with zero point ``2^(b-1)``)."""

ACTIVATION_FORMATS = ("int", "fp16", "float32")
"""What a layer input becomes: ``int`` (uniform affine fake quantization at ``a_bits``),
``fp16`` (rounded to float16, EMOMC) or ``float32`` (untouched). In every format an
``a_bits >= 32`` means float."""


def _ste(x, xq):
  """Forward exactly ``xq``, backward identity.

  (``x + stop_gradient(xq - x)`` rounds: a clipped outlier x = 258 quantized to 1.43
  came out as 1.43 - 1.5e-5.)
  """
  return jax.lax.stop_gradient(xq) + (x - jax.lax.stop_gradient(x))


def _levels(bits):
  # Exactly 2**bits: jnp.exp2 lowers to exp(b * ln 2) on XLA:CPU, which is off by up to
  # ~1e-5 relative (qmax 0.99999 at 1 bit inside a fusion; non-integers from 13 bits).
  return jnp.ldexp(jnp.float32(1.0), jnp.asarray(bits).astype(jnp.int32))


def _round(v, x, up=None):
  """``round(v)``, or ``floor(v) + up`` (learned rounding, AdaRound) where ``x != 0`` and
  ``up`` is 0 or 1 (``up == 2``: nearest)."""
  if up is None:
    return jnp.round(v)
  learned = (x != 0) & (up < 2)
  return jnp.where(learned, jnp.floor(v) + jnp.minimum(up, 1).astype(v.dtype), jnp.round(v))


def quantize_symmetric(x, bits, reduce_axes=None, full=False, clip=None, up=None):
  """Symmetric fake quantization (narrow range by default).

  Narrow: ``step = max|x| / (2^(b-1) - 1)``, integers clipped to
  ``[-(2^(b-1)-1), 2^(b-1)-1]``; this is EMOMC's formula. Full (``full=True``):
  ``step = 2 max|x| / (2^b - 1)``, integers in ``[-2^(b-1), 2^(b-1)-1]``. For ``b == 1``
  the binary quantizer ``sign(x) * mean|x|`` is used in both. All-zero tensors stay zero.

  Args:
    x: array to quantize.
    bits: scalar bit-width (traced), ``>= 32`` means float pass-through.
    reduce_axes: axes over which one scale is shared (``None``: the whole tensor,
      i.e. per-tensor; all axes but the output-channel axis: per-channel).
    full: full integer range (Python bool, static).
    clip: optional clip ratio (broadcastable to the keepdims ``max|x|``, e.g. per
      channel): the range is ``clip * max|x|`` (MSE calibration).
    up: optional learned rounding (AdaRound), 0 / 1 per element of ``x``: integers
      are ``floor(x / step) + up`` (nonzero ``x``) instead of the nearest; 2: nearest.

  Returns:
    Fake-quantized ``x`` (same shape and dtype) with identity STE gradient.
  """
  bits = jnp.asarray(bits)
  step, qmin, qmax = symmetric_params(x, bits, reduce_axes, full, clip)
  xq = jnp.clip(_round(x / step, x, up), qmin, qmax) * step
  binary = jnp.sign(x) * jnp.mean(jnp.abs(x), axis=reduce_axes, keepdims=True)
  xq = jnp.where(bits <= 1, binary, xq)
  xq = jnp.where(bits >= FLOAT_BITS, x, xq)
  return _ste(x, xq.astype(x.dtype))


def symmetric_params(x, bits, reduce_axes=None, full=False, clip=None):
  """Step and integer range of :func:`quantize_symmetric` (``bits >= 2``).

  Args:
    x, bits, reduce_axes, full, clip: as :func:`quantize_symmetric`.

  Returns:
    ``(step, qmin, qmax)``: ``amax = max|x|`` (keepdims over ``reduce_axes``, times
    ``clip``); narrow: ``qmax = max(2^(b-1) - 1, 1)``, ``qmin = -qmax``,
    ``step = amax / qmax``; full: ``qmax = 2^(b-1) - 1``, ``qmin = -2^(b-1)``,
    ``step = amax / (qmax + 1/2)``. A zero step becomes 1.
  """
  bits = jnp.asarray(bits)
  amax = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True)
  if clip is not None:
    amax = amax * clip
  if full:
    qmax = _levels(bits - 1) - 1.0
    qmin = -_levels(bits - 1)
    step = amax / (qmax + 0.5)
  else:
    qmax = jnp.maximum(_levels(bits - 1) - 1.0, 1.0)
    qmin = -qmax
    step = amax / qmax
  # A tiny max|x| underflows to a flushed subnormal (0): treat it like an all-zero tensor.
  step = jnp.where(step > 0, step, 1.0)
  return step, qmin, qmax


def affine_params(lo, hi, bits, narrow=False):
  """Scale and zero point of a uniform affine quantizer for range ``[lo, hi]``.

  The range is widened to contain 0 so that zero is exactly representable (as in
  every integer inference engine). A zero-width range gives ``scale = 1``.

  Args:
    lo, hi: the range.
    bits: bit-width (traced).
    narrow: integers in ``[0, 2^b - 2]`` instead of ``[0, 2^b - 1]`` (static).

  Returns:
    ``(scale, zero_point, qmax)`` with integers in ``[0, qmax]``.
  """
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  qmax = _levels(bits) - 1.0
  if narrow:
    qmax = jnp.maximum(qmax - 1.0, 1.0)
  scale = (hi - lo) / qmax
  scale = jnp.where(scale > 0, scale, 1.0)   # zero-width or underflowing range
  zero_point = jnp.round(-lo / scale)
  return scale, zero_point, qmax


def symmetric_act_params(lo, hi, bits):
  """Scale and zero point of the ``symmetric`` activation quantizer (``ACT_QUANTS``).

  Returns:
    ``(scale, zero_point, qmax)``: unsigned (``lo >= 0``): ``scale = hi / (2^b - 1)``,
    zero point 0; signed: ``scale = 2 max(-lo, hi) / (2^b - 1)``, zero point
    ``2^(b-1)``; integers in ``[0, 2^b - 1]``. A zero scale becomes 1.
  """
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  levels = _levels(bits)
  qmax = levels - 1.0
  signed = lo < 0
  scale = jnp.where(signed, 2.0 * jnp.maximum(-lo, hi), hi) / qmax
  scale = jnp.where(scale > 0, scale, 1.0)
  zero_point = jnp.where(signed, levels / 2, 0.0)
  return scale, zero_point, qmax


def act_params(lo, hi, bits, act_quant="affine"):
  """``(scale, zero_point, qmax)`` of an activation quantizer (``ACT_QUANTS``)."""
  if act_quant == "affine":
    return affine_params(lo, hi, bits)
  if act_quant == "symmetric":
    return symmetric_act_params(lo, hi, bits)
  raise ValueError(f"act_quant={act_quant!r} is invalid; allowed: {ACT_QUANTS}")


def quantize_affine(x, bits, lo, hi, clipped_ste=True, act_quant="affine", narrow=False,
                    up=None):
  """Uniform affine fake quantization to the range ``[lo, hi]``.

  ``q = clip(round(x / scale) + zp, 0, qmax)``, ``x_hat = (q - zp) * scale`` with
  ``(scale, zp, qmax)`` from :func:`affine_params` (``act_quant="affine"``, the default)
  or :func:`symmetric_act_params` (``"symmetric"``).

  Args:
    x: array.
    bits: scalar bit-width (traced); ``>= 32`` means float pass-through.
    lo, hi: range (broadcastable to ``x``), e.g. calibration statistics.
    clipped_ste: if True, the gradient is zero where ``x`` falls outside the range.
    act_quant: one of ``ACT_QUANTS`` (static).
    narrow: affine only: integers in ``[0, 2^b - 2]`` (static).
    up: optional learned rounding (weights, AdaRound; see :func:`quantize_symmetric`).

  Returns:
    Fake-quantized ``x``.
  """
  bits = jnp.asarray(bits)
  if act_quant == "affine":
    scale, zp, qmax = affine_params(lo, hi, bits, narrow)
  else:
    scale, zp, qmax = act_params(lo, hi, bits, act_quant)
  q = jnp.clip(_round(x / scale, x, up) + zp, 0.0, qmax)
  xq = ((q - zp) * scale).astype(x.dtype)
  xq = jnp.where(bits >= FLOAT_BITS, x, xq)
  out = _ste(x, xq)
  if clipped_ste:
    inside = (x >= jnp.minimum(lo, 0.0)) & (x <= jnp.maximum(hi, 0.0))
    inside = inside | (bits >= FLOAT_BITS)
    # Gradient flows only inside the range; the forward value is unchanged.
    out = jnp.where(inside, out, jax.lax.stop_gradient(out))
  return out


def default_weight_range(mode: str) -> str:
  """The integer range a weight mode uses when none is given: ``narrow`` for symmetric
  modes, ``full`` for asymmetric ones."""
  return "narrow" if mode.startswith("symmetric") else "full"


def resolve_weight_quantizer(mode: str, weight_range: str | None = None) -> str:
  """Checks a weight mode and range; returns the range (``None``: the mode's default).

  Raises:
    ValueError naming ``weight_quant`` / ``weight_range`` and the allowed values.
  """
  if mode not in WEIGHT_MODES:
    raise ValueError(f"weight_quant={mode!r} is invalid; allowed: {WEIGHT_MODES}")
  if weight_range is None:
    return default_weight_range(mode)
  if weight_range not in WEIGHT_RANGES:
    raise ValueError(f"weight_range={weight_range!r} is invalid; allowed: "
                     f"{(None,) + WEIGHT_RANGES}")
  return weight_range


def _weight_range_args(w, mode, clip):
  axes = tuple(range(w.ndim - 1)) if mode.endswith("per_channel") else None
  lo = jnp.min(w, axis=axes, keepdims=True)
  hi = jnp.max(w, axis=axes, keepdims=True)
  if clip is not None:
    lo, hi = lo * clip, hi * clip
  return axes, lo, hi


def weight_grid(w, bits, mode="symmetric_per_channel", weight_range=None, clip=None):
  """``(scale, zero_point, qmin, qmax)`` of :func:`quantize_weight` (``bits >= 2``):
  ``w_hat = (clip(round(w / scale) + zero_point, qmin, qmax) - zero_point) * scale``."""
  full = resolve_weight_quantizer(mode, weight_range) == "full"
  axes, lo, hi = _weight_range_args(w, mode, clip)
  if mode.startswith("symmetric"):
    step, qmin, qmax = symmetric_params(w, bits, axes, full, clip)
    return step, jnp.zeros_like(step), qmin, qmax
  scale, zp, qmax = affine_params(lo, hi, bits, narrow=not full)
  return scale, zp, jnp.zeros_like(qmax), qmax


def quantize_weight(w, bits, mode="symmetric_per_channel", weight_range=None, clip=None,
                    up=None):
  """Quantizes a kernel whose LAST axis is the output-channel axis (HWIO or [in, out]).

  Args:
    w: kernel.
    bits: scalar bit-width (traced).
    mode: one of ``WEIGHT_MODES``.
    weight_range: one of ``WEIGHT_RANGES`` or None (the mode's default).
    clip: optional clip ratio per channel (``[C]``) or per tensor (scalar) scaling the
      range (``max|w|``, or min and max); None: the full min / max range.
    up: optional learned rounding, 0 / 1 per weight (AdaRound tables); None: nearest.
  """
  full = resolve_weight_quantizer(mode, weight_range) == "full"
  axes, lo, hi = _weight_range_args(w, mode, clip)
  if mode.startswith("symmetric"):
    return quantize_symmetric(w, bits, axes, full, clip, up)
  return quantize_affine(w, bits, lo, hi, clipped_ste=False, narrow=not full, up=up)


def weight_integers(w, bits, mode="symmetric_per_channel", weight_range=None, clip=None,
                    up=None):
  """The integer form of :func:`quantize_weight`: ``(q, scale, zero_point)``.

  ``quantize_weight(w, bits, mode, weight_range, clip, up) == (q - zero_point) * scale``
  exactly (float32), for bit-widths 1..31 (the same operations as the fake quantizer):

  * symmetric, ``b >= 2``: ``q`` in ``[-(2^(b-1)-1), 2^(b-1)-1]`` (narrow) or
    ``[-2^(b-1), 2^(b-1)-1]`` (full), ``zero_point = 0``;
  * symmetric, ``b == 1`` (binary): ``q = sign(w)`` in ``{-1, 0, 1}``,
    ``scale = mean|w|``, ``zero_point = 0``;
  * asymmetric: ``q`` in ``[0, 2^b - 1]`` (full) or ``[0, 2^b - 2]`` (narrow),
    ``scale, zero_point`` from :func:`affine_params` of the (per-channel, clipped)
    min / max.

  Args:
    w: kernel, output channels on the LAST axis.
    bits: scalar bit-width (traced) in 1..31.
    mode, weight_range, clip, up: as :func:`quantize_weight`.

  Returns:
    float32 ``q`` (integer values, shape of ``w``) and ``scale``, ``zero_point`` with
    keepdims shape (``[1, .., 1, C]`` per channel, all ones per tensor).
  """
  full = resolve_weight_quantizer(mode, weight_range) == "full"
  bits = jnp.asarray(bits)
  axes, lo, hi = _weight_range_args(w, mode, clip)
  if mode.startswith("symmetric"):
    step, qmin, qmax = symmetric_params(w, bits, axes, full, clip)
    q = jnp.clip(_round(w / step, w, up), qmin, qmax)
    binary = bits <= 1
    scale = jnp.where(binary, jnp.mean(jnp.abs(w), axis=axes, keepdims=True), step)
    q = jnp.where(binary, jnp.sign(w), q)
    return q, scale, jnp.zeros_like(scale)
  scale, zp, qmax = affine_params(lo, hi, bits, narrow=not full)
  return jnp.clip(_round(w / scale, w, up) + zp, 0.0, qmax), scale, zp


def round_fp16(x, bits=None):
  """Rounds ``x`` to float16 and back (EMOMC's FP16 activations); ``bits >= 32``: float.

  The forward value is the float16 value, the gradient the identity.
  """
  xq = x.astype(jnp.float16).astype(x.dtype)
  if bits is not None:
    xq = jnp.where(jnp.asarray(bits) >= FLOAT_BITS, x, xq)
  return _ste(x, xq)


def magnitude_ranks(w):
  """Rank of every entry of ``w`` by decreasing magnitude (0 = largest), ties by index.

  Precompute this once per float checkpoint: ``prune(w, keep, ranks)`` is then a
  comparison per configuration instead of a sort.
  """
  flat = jnp.abs(w).reshape(-1)
  order = jnp.argsort(-flat, stable=True)
  ranks = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
  return ranks.reshape(w.shape)


def keep_count(num_weights, keep):
  """``round(N * keep)`` (round half to even, as numpy) as an int32 array."""
  return jnp.round(jnp.asarray(num_weights, jnp.float32) * keep).astype(jnp.int32)


def prune(w, keep, ranks=None):
  """Unstructured magnitude pruning keeping exactly ``round(N * keep)`` weights.

  Args:
    w: weights.
    keep: scalar keep ratio in ``(0, 1]`` (traced).
    ranks: optional precomputed ``magnitude_ranks(w)``; without it the ranks are
      computed here (a sort), skipped entirely at run time when ``keep >= 1``.

  Returns:
    ``w`` with all but the ``round(N*keep)`` largest-magnitude entries set to zero.
    Gradients pass to kept weights only.
  """
  keep = jnp.asarray(keep, jnp.float32)
  k = keep_count(w.size, keep)
  if ranks is None:
    ranks = jax.lax.cond(keep < 1.0, magnitude_ranks,
                         lambda v: jnp.zeros(v.shape, jnp.int32), w)
  return jnp.where(ranks < k, w, jnp.zeros_like(w))
