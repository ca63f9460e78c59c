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


def quantize_symmetric(x, bits, reduce_axes=None):
  """Symmetric (narrow-range) fake quantization.

  ``step = max|x| / (2^(b-1) - 1)``, integers clipped to ``[-(2^(b-1)-1), 2^(b-1)-1]``;
  this is EMOMC's formula. For ``b == 1`` (where that range is empty) the binary
  quantizer ``sign(x) * mean|x|`` is used. All-zero tensors stay zero.

  Args:
    x: array to quantize.
    bits: scalar bit-width (traced), ``>= 32`` means float pass-through.
    reduce_axes: axes over which one scale is shared (``None``: the whole tensor,
      i.e. per-tensor; all axes but the output-channel axis: per-channel).

  Returns:
    Fake-quantized ``x`` (same shape and dtype) with identity STE gradient.
  """
  bits = jnp.asarray(bits)
  step, qmax = symmetric_step(x, bits, reduce_axes)
  xq = jnp.clip(jnp.round(x / step), -qmax, qmax) * step
  binary = jnp.sign(x) * jnp.mean(jnp.abs(x), axis=reduce_axes, keepdims=True)
  xq = jnp.where(bits <= 1, binary, xq)
  xq = jnp.where(bits >= FLOAT_BITS, x, xq)
  return _ste(x, xq.astype(x.dtype))


def symmetric_step(x, bits, reduce_axes=None):
  """Step and largest integer of :func:`quantize_symmetric` (``bits >= 2``).

  Returns:
    ``(step, qmax)``: ``step = max|x| / qmax`` (keepdims over ``reduce_axes``; 1 where
    that is 0), ``qmax = max(2^(b-1) - 1, 1)``.
  """
  bits = jnp.asarray(bits)
  amax = jnp.max(jnp.abs(x), axis=reduce_axes, keepdims=True)
  qmax = jnp.maximum(_levels(bits - 1) - 1.0, 1.0)
  step = amax / qmax
  # A tiny max|x| underflows to a flushed subnormal (0): treat it like an all-zero tensor.
  step = jnp.where(step > 0, step, 1.0)
  return step, qmax


def affine_params(lo, hi, bits):
  """Scale and zero point of a uniform affine quantizer for range ``[lo, hi]``.

  The range is widened to contain 0 so that zero is exactly representable (as in
  every integer inference engine). A zero-width range gives ``scale = 1``.

  Returns:
    ``(scale, zero_point, qmax)`` with integers in ``[0, qmax]``.
  """
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  qmax = _levels(bits) - 1.0
  scale = (hi - lo) / qmax
  scale = jnp.where(scale > 0, scale, 1.0)   # zero-width or underflowing range
  zero_point = jnp.round(-lo / scale)
  return scale, zero_point, qmax


def quantize_affine(x, bits, lo, hi, clipped_ste=True):
  """Uniform affine (asymmetric) fake quantization to the range ``[lo, hi]``.

  ``q = clip(round(x / scale) + zp, 0, 2^b - 1)``, ``x_hat = (q - zp) * scale``.

  Args:
    x: array.
    bits: scalar bit-width (traced); ``>= 32`` means float pass-through.
    lo, hi: range (broadcastable to ``x``), e.g. calibration statistics.
    clipped_ste: if True, the gradient is zero where ``x`` falls outside the range.

  Returns:
    Fake-quantized ``x``.
  """
  bits = jnp.asarray(bits)
  scale, zp, qmax = affine_params(lo, hi, bits)
  q = jnp.clip(jnp.round(x / scale) + zp, 0.0, qmax)
  xq = ((q - zp) * scale).astype(x.dtype)
  xq = jnp.where(bits >= FLOAT_BITS, x, xq)
  out = _ste(x, xq)
  if clipped_ste:
    inside = (x >= jnp.minimum(lo, 0.0)) & (x <= jnp.maximum(hi, 0.0))
    inside = inside | (bits >= FLOAT_BITS)
    # Gradient flows only inside the range; the forward value is unchanged.
    out = jnp.where(inside, out, jax.lax.stop_gradient(out))
  return out


def quantize_weight(w, bits, mode="symmetric_per_channel"):
  """Quantizes a kernel whose LAST axis is the output-channel axis (HWIO or [in, out]).

  Args:
    w: kernel.
    bits: scalar bit-width (traced).
    mode: one of ``WEIGHT_MODES``.
  """
  if mode not in WEIGHT_MODES:
    raise ValueError(f"weight_quant mode {mode!r} is not one of {WEIGHT_MODES}")
  per_channel = mode.endswith("per_channel")
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  if mode.startswith("symmetric"):
    return quantize_symmetric(w, bits, axes)
  lo = jnp.min(w, axis=axes, keepdims=True)
  hi = jnp.max(w, axis=axes, keepdims=True)
  return quantize_affine(w, bits, lo, hi, clipped_ste=False)


def weight_integers(w, bits, mode="symmetric_per_channel"):
  """The integer form of :func:`quantize_weight`: ``(q, scale, zero_point)``.

  ``quantize_weight(w, bits, mode) == (q - zero_point) * scale`` exactly (float32), for
  bit-widths 1..31 (the same operations as the fake quantizer):

  * symmetric, ``b >= 2``: ``q`` in ``[-(2^(b-1)-1), 2^(b-1)-1]``, ``zero_point = 0``;
  * symmetric, ``b == 1`` (binary): ``q = sign(w)`` in ``{-1, 0, 1}``,
    ``scale = mean|w|``, ``zero_point = 0``;
  * asymmetric: ``q`` in ``[0, 2^b - 1]``, ``scale, zero_point`` from
    :func:`affine_params` of the (per-channel) min / max.

  Args:
    w: kernel, output channels on the LAST axis.
    bits: scalar bit-width (traced) in 1..31.
    mode: one of ``WEIGHT_MODES``.

  Returns:
    float32 ``q`` (integer values, shape of ``w``) and ``scale``, ``zero_point`` with
    keepdims shape (``[1, .., 1, C]`` per channel, all ones per tensor).
  """
  if mode not in WEIGHT_MODES:
    raise ValueError(f"weight_quant mode {mode!r} is not one of {WEIGHT_MODES}")
  bits = jnp.asarray(bits)
  axes = tuple(range(w.ndim - 1)) if mode.endswith("per_channel") else None
  if mode.startswith("symmetric"):
    step, qmax = symmetric_step(w, bits, axes)
    q = jnp.clip(jnp.round(w / step), -qmax, qmax)
    binary = bits <= 1
    scale = jnp.where(binary, jnp.mean(jnp.abs(w), axis=axes, keepdims=True), step)
    q = jnp.where(binary, jnp.sign(w), q)
    return q, scale, jnp.zeros_like(scale)
  lo = jnp.min(w, axis=axes, keepdims=True)
  hi = jnp.max(w, axis=axes, keepdims=True)
  scale, zp, qmax = affine_params(lo, hi, bits)
  return jnp.clip(jnp.round(w / scale) + zp, 0.0, qmax), scale, zp


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
