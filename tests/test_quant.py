"""Fake-quantizer and pruning numerics against an independent numpy reference.

XLA:CPU divides by a broadcast scalar as ``x * (1 / step)`` (up to 1 ulp off a true
division), so an element lying within float error of a rounding boundary may land one
step away from numpy's answer. ``assert_quantized`` allows exactly that, and only
there; hand-made rounding-tie cases use power-of-two steps where both are exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nemo_jax._src import quant
from nemo_jax._src.layers import QContext, QConv, QDense
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.spec import QuantSpec

SPEC = QuantSpec(weight_quant="symmetric_per_channel")


def _context(w_bits=None, a_bits=None, keep=None, calibration=None, prune_ranks=None):
  """The standard quantizers of one configuration (the weight quantizer of these
  tests: symmetric per channel)."""
  return QContext.from_config(QuantConfig(w_bits=w_bits, a_bits=a_bits, keep=keep),
                              calibration, spec=SPEC, prune_ranks=prune_ranks)

F32 = np.float32


# ----------------------------------------------------------------------------- numpy reference


def np_symmetric(x, bits, axes=None):
  """EMOMC: step = max|x| / (2^(b-1) - 1), integers in [-(2^(b-1)-1), 2^(b-1)-1]."""
  x = np.asarray(x, F32)
  if bits >= 32:
    return x, np.ones_like(x)
  if bits == 1:  # binary: sign(x) * mean|x|
    return np.sign(x) * np.mean(np.abs(x), axis=axes, keepdims=True, dtype=F32), None
  qmax = F32(2 ** (bits - 1) - 1)
  amax = np.max(np.abs(x), axis=axes, keepdims=True)
  step = np.where(amax > 0, amax / qmax, F32(1)).astype(F32)
  return (np.clip(np.round(x / step), -qmax, qmax) * step).astype(F32), step


def np_affine(x, bits, lo, hi):
  """Asymmetric: range widened to contain 0, q in [0, 2^b - 1], zero point rounded."""
  x = np.asarray(x, F32)
  if bits >= 32:
    return x, np.ones_like(x)
  lo = np.minimum(np.asarray(lo, F32), F32(0))
  hi = np.maximum(np.asarray(hi, F32), F32(0))
  qmax = F32(2 ** bits - 1)
  scale = np.where(hi > lo, (hi - lo) / qmax, F32(1)).astype(F32)
  zero_point = np.round(-lo / scale)
  q = np.clip(np.round(x / scale) + zero_point, 0, qmax)
  return ((q - zero_point) * scale).astype(F32), scale


def np_symmetric_full(x, bits, axes=None, clip=1.0):
  """PyTorch's full-range symmetric: step = 2 clip max|x| / (2^b - 1), q in
  [-2^(b-1), 2^(b-1) - 1]."""
  x = np.asarray(x, F32)
  amax = (np.max(np.abs(x), axis=axes, keepdims=True) * F32(clip)).astype(F32)
  step = (amax / F32(2 ** (bits - 1) - 0.5)).astype(F32)
  step = np.where(step > 0, step, F32(1)).astype(F32)
  q = np.clip(np.round(x / step), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
  return (q * step).astype(F32), step


def np_affine_narrow(x, bits, lo, hi):
  """Asymmetric narrow range: q in [0, 2^b - 2]."""
  lo = np.minimum(np.asarray(lo, F32), F32(0))
  hi = np.maximum(np.asarray(hi, F32), F32(0))
  qmax = F32(max(2 ** bits - 2, 1))
  scale = np.where(hi > lo, (hi - lo) / qmax, F32(1)).astype(F32)
  zero_point = np.round(-lo / scale)
  q = np.clip(np.round(x / scale) + zero_point, 0, qmax)
  return ((q - zero_point) * scale).astype(F32), scale


def np_symmetric_act(x, bits, lo, hi):
  """Zero point fixed: unsigned [0, 2^b - 1] if lo >= 0, else signed, codes offset 2^(b-1)."""
  lo, hi = min(F32(lo), F32(0)), max(F32(hi), F32(0))
  qmax = F32(2 ** bits - 1)
  if lo < 0:
    scale, zp = F32(2 * max(-lo, hi)) / qmax, F32(2 ** (bits - 1))
  else:
    scale, zp = F32(hi) / qmax, F32(0)
  scale = scale if scale > 0 else F32(1)
  q = np.clip(np.round(np.asarray(x, F32) / scale) + zp, 0, qmax)
  return ((q - zp) * scale).astype(F32), scale


def np_prune_mask(w, keep):
  """Keeps the round(N * keep) largest |w|, ties broken by flat index (stable sort)."""
  w = np.asarray(w)
  k = int(np.round(F32(w.size) * F32(keep)))  # float32 product, round half to even
  order = np.argsort(-np.abs(w).reshape(-1), kind="stable")
  mask = np.zeros(w.size, bool)
  mask[order[:k]] = True
  return mask.reshape(w.shape), k


def assert_quantized(actual, expected, step, x):
  """Equal to float precision, except one step where ``x / step`` sits on a boundary."""
  actual, expected = np.asarray(actual, F32), np.asarray(expected, F32)
  assert np.all(np.isfinite(actual))
  step = np.broadcast_to(step, expected.shape)
  ratio = np.asarray(x, np.float64) / step
  on_boundary = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-5
  close = np.abs(actual - expected) <= 1e-6 * np.maximum(np.abs(expected), step)
  one_step = np.abs(np.abs(actual - expected) - step) <= 1e-5 * step
  assert np.all(close | (on_boundary & one_step)), (actual[~close], expected[~close])


# ----------------------------------------------------------------------------- strategies

jit_symmetric = jax.jit(quant.quantize_symmetric, static_argnums=2)
jit_affine = jax.jit(quant.quantize_affine)
jit_weight = jax.jit(quant.quantize_weight, static_argnums=2)

# Zero or |x| >= 1e-6: XLA:CPU flushes subnormals to zero and a step computed from
# a tiny max|x| underflows (test_tiny_tensors_do_not_give_nan), numpy does neither.
_magnitudes = st.floats(float(F32(1e-6)), 1e4, width=32)
finite = st.one_of(st.just(0.0), _magnitudes, _magnitudes.map(lambda v: -v))
arrays = hnp.arrays(F32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=5),
                    elements=finite)
kernels = hnp.arrays(F32, hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=5),
                     elements=finite)
bit_widths = st.sampled_from([1, 2, 3, 4, 5, 8, 12, 16, 32])


# ----------------------------------------------------------------------------- rounding


def test_rounding_is_half_to_even_and_clipped_symmetric():
  # 8 bits, max|x| = 127: step is exactly 1, so the ties are exact
  x = np.array([-127.0, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49, 126.6, 127.0], F32)
  expected = np.array([-127, -2, -2, -0, 0, 2, 2, 3, 127, 127], F32)
  np.testing.assert_array_equal(quant.quantize_symmetric(x, 8), expected)
  # 2 bits: three levels {-1, 0, 1} * max|x| (step 2; 1.0 / 2 is an exact tie -> 0)
  x = np.array([-2.0, -1.2, -0.9, 0.9, 1.0, 1.1, 2.0], F32)
  np.testing.assert_array_equal(quant.quantize_symmetric(x, 2),
                                np.array([-2, -2, 0, 0, 0, 2, 2], F32))


def test_affine_hand_computed_zero_point_and_clipping():
  # range [-1, 2], 2 bits: scale 1, zero point 1, integers 0..3 -> values -1..2
  x = np.array([-3.0, -1.0, -0.4, 0.5, 1.5, 2.0, 5.0], F32)
  out = quant.quantize_affine(x, 2, -1.0, 2.0)
  np.testing.assert_array_equal(out, np.array([-1, -1, 0, 0, 2, 2, 2], F32))
  scale, zero_point, qmax = quant.affine_params(-1.0, 2.0, 2)
  assert (float(scale), float(zero_point), float(qmax)) == (1.0, 1.0, 3.0)
  # a positive range is widened to contain 0: [0.5, 2] -> [0, 2], zero point 0
  scale, zero_point, _ = quant.affine_params(0.5, 2.0, 2)
  assert float(zero_point) == 0.0 and np.isclose(float(scale), 2.0 / 3.0)
  np.testing.assert_allclose(quant.quantize_affine(np.array([0.0, 0.2, 0.9, 3.0], F32), 2,
                                                  0.5, 2.0),
                             np.array([0.0, 0.0, 2 / 3, 2.0], F32), rtol=1e-6)


@settings(deadline=None, max_examples=40)
@given(x=arrays, bits=bit_widths)
def test_symmetric_per_tensor_matches_numpy(x, bits):
  expected, step = np_symmetric(x, bits)
  actual = jit_symmetric(x, jnp.int32(bits), None)
  if step is None:  # binary
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-30)
  else:
    assert_quantized(actual, expected, step, x)
  if 2 <= bits < 32:
    assert len(np.unique(np.asarray(actual))) <= 2 ** bits - 1  # narrow range
    np.testing.assert_array_equal(jit_symmetric(-x, jnp.int32(bits), None), -actual)


@settings(deadline=None, max_examples=40)
@given(w=kernels, bits=bit_widths)
def test_symmetric_per_channel_matches_numpy(w, bits):
  axes = tuple(range(w.ndim - 1))
  expected, step = np_symmetric(w, bits, axes)
  actual = jit_weight(w, jnp.int32(bits), "symmetric_per_channel")
  if step is None:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-30)
  else:
    assert_quantized(actual, expected, step, w)


@settings(deadline=None, max_examples=40)
@given(w=kernels, bits=st.sampled_from([2, 3, 4, 8]), per_channel=st.booleans(),
       clip=st.sampled_from([1.0, 0.5, 0.83]))
def test_full_range_symmetric_weights_match_numpy(w, bits, per_channel, clip):
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  mode = "symmetric_per_channel" if per_channel else "symmetric_per_tensor"
  expected, step = np_symmetric_full(w, bits, axes, clip)
  actual = jax.jit(quant.quantize_weight, static_argnums=(2, 3))(
      w, jnp.int32(bits), mode, "full", None if clip == 1.0 else F32(clip))
  # +-max|w| sits exactly on a rounding tie (x / step = +-(2^(b-1) - 1/2)): XLA's
  # x * (1 / step) may land on either side, one step apart (float32: up to ~1e-5).
  actual, step = np.asarray(actual), np.broadcast_to(step, expected.shape)
  diff = np.abs(actual - expected)
  ratio = np.abs(np.asarray(w, np.float64) / step)
  tie = np.abs(ratio - np.floor(ratio) - 0.5) < 1e-5
  assert np.all((diff <= 1e-6 * np.maximum(np.abs(expected), step))
                | (tie & (np.abs(diff - step) <= 1e-4 * step)))
  levels = np.unique(np.round(np.asarray(actual) / step))
  assert levels.min() >= -2 ** (bits - 1) and levels.max() <= 2 ** (bits - 1) - 1


def test_full_and_narrow_integer_ranges():
  x = np.array([-1.0, 0.25, 1.0], F32)
  for bits in (2, 3, 8):
    step, qmin, qmax = quant.symmetric_params(x, bits, full=True)
    h = 2 ** (bits - 1)
    assert (float(qmin), float(qmax)) == (-h, h - 1)
    np.testing.assert_allclose(np.asarray(step).reshape(()), 2.0 / (2 ** bits - 1), rtol=1e-6)
    step, qmin, qmax = quant.symmetric_params(x, bits)
    assert (float(qmin), float(qmax)) == (-(h - 1), h - 1)
    _, _, qmax = quant.affine_params(-1.0, 1.0, bits, narrow=True)
    assert float(qmax) == 2 ** bits - 2
  # 2 bits: full range has 4 levels {-2, -1, 0, 1} * 2/3 (the narrow one 3)
  x = np.linspace(-1, 1, 1001, dtype=F32)
  full = np.unique(np.asarray(quant.quantize_weight(x, 2, "symmetric_per_tensor", "full")))
  np.testing.assert_allclose(full, np.array([-4, -2, 0, 2], F32) / 3, rtol=1e-6)
  assert len(np.unique(np.asarray(quant.quantize_weight(x, 2, "symmetric_per_tensor")))) == 3


@settings(deadline=None, max_examples=40)
@given(w=kernels, bits=st.sampled_from([2, 3, 8]), per_channel=st.booleans())
def test_narrow_asymmetric_weights_match_numpy(w, bits, per_channel):
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  expected, scale = np_affine_narrow(w, bits, np.min(w, axis=axes, keepdims=True),
                                     np.max(w, axis=axes, keepdims=True))
  mode = "asymmetric_per_channel" if per_channel else "asymmetric_per_tensor"
  actual = jax.jit(quant.quantize_weight, static_argnums=(2, 3))(w, jnp.int32(bits), mode,
                                                                "narrow")
  assert_quantized(actual, expected, scale, w)


@settings(deadline=None, max_examples=40)
@given(x=arrays, bits=st.sampled_from([2, 4, 8]), data=st.data())
def test_symmetric_activations_match_numpy(x, bits, data):
  lo = data.draw(st.sampled_from([0.0, 0.5, -1.0, -30.0]))
  hi = data.draw(st.sampled_from([0.0, 2.0, 40.0]))
  expected, scale = np_symmetric_act(x, bits, lo, hi)
  actual = jax.jit(quant.quantize_affine, static_argnames="act_quant")(
      x, jnp.int32(bits), F32(lo), F32(hi), act_quant="symmetric")
  assert_quantized(actual, expected, scale, x)
  _, zp, _ = quant.act_params(F32(lo), F32(hi), bits, "symmetric")
  assert float(zp) == (2 ** (bits - 1) if lo < 0 else 0)


def test_bad_weight_range_and_act_quant_are_named():
  with pytest.raises(ValueError, match="weight_range='wide'.*narrow"):
    quant.quantize_weight(np.ones((2, 2), F32), 4, "symmetric_per_channel", "wide")
  with pytest.raises(ValueError, match="act_quant='signed'.*affine"):
    quant.act_params(0.0, 1.0, 4, "signed")


def test_per_channel_scales_are_independent():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 3, 4, 5)).astype(F32)
  big = w.copy()
  big[..., 2] *= 1000.0  # one loud channel must not coarsen the others
  a = np.asarray(quant.quantize_weight(w, 4, "symmetric_per_channel"))
  b = np.asarray(quant.quantize_weight(big, 4, "symmetric_per_channel"))
  keep = [0, 1, 3, 4]
  np.testing.assert_array_equal(a[..., keep], b[..., keep])
  per_tensor = np.asarray(quant.quantize_weight(big, 4, "symmetric_per_tensor"))
  assert np.all(per_tensor[..., keep] == 0)  # per tensor, they all round to zero
  for c in range(5):  # at most 2^4 - 1 levels per channel
    assert len(np.unique(a[..., c])) <= 15


@settings(deadline=None, max_examples=40)
@given(x=arrays, bits=bit_widths, data=st.data())
def test_affine_matches_numpy(x, bits, data):
  lo = data.draw(st.floats(-100, 10, width=32, allow_subnormal=False))
  hi = data.draw(st.floats(-10, 100, width=32, allow_subnormal=False))
  assume(max(hi, 0.0) - min(lo, 0.0) == 0.0 or max(hi, 0.0) - min(lo, 0.0) > 1e-20)
  expected, scale = np_affine(x, bits, lo, hi)
  actual = jit_affine(x, jnp.int32(bits), F32(lo), F32(hi))
  assert_quantized(actual, expected, scale, x)
  zero = jit_affine(np.zeros(1, F32), jnp.int32(bits), F32(lo), F32(hi))
  assert float(zero[0]) == 0.0  # 0 is exactly representable


@settings(deadline=None, max_examples=40)
@given(w=kernels, bits=st.sampled_from([2, 3, 4, 8, 32]),
       per_channel=st.booleans())
def test_asymmetric_weights_match_numpy(w, bits, per_channel):
  axes = tuple(range(w.ndim - 1)) if per_channel else None
  lo = np.min(w, axis=axes, keepdims=True)
  hi = np.max(w, axis=axes, keepdims=True)
  expected, scale = np_affine(w, bits, lo, hi)
  mode = "asymmetric_per_channel" if per_channel else "asymmetric_per_tensor"
  assert_quantized(jit_weight(w, jnp.int32(bits), mode), expected, scale, w)


@pytest.mark.parametrize("bits", [2, 8])
def test_2_and_8_bit_error_bounds(bits):
  rng = np.random.default_rng(bits)
  x = rng.normal(size=1000).astype(F32)
  step = np.abs(x).max() / (2 ** (bits - 1) - 1)
  err = np.abs(np.asarray(quant.quantize_symmetric(x, bits)) - x)
  assert err.max() <= step / 2 * (1 + 1e-5)
  lo, hi = -1.0, 1.5  # values outside are clipped to the range ends
  scale = 2.5 / (2 ** bits - 1)
  out = np.asarray(quant.quantize_affine(x, bits, lo, hi))
  inside = (x >= lo) & (x <= hi)
  # the rounded zero point shifts the grid ends by < scale / 2: values clipped there
  # are still within half a step
  assert np.abs(out - x)[inside].max() <= scale / 2 * (1 + 1e-4)
  assert out.min() >= lo - scale / 2 and out.max() <= hi + scale / 2


@pytest.mark.parametrize("bits", [1, 2, 8, 32])
@pytest.mark.parametrize("value", [0.0, 3.0, -0.25])
def test_zero_and_constant_tensors_stay_finite(bits, value):
  x = np.full((2, 3, 4), value, F32)
  outs = [quant.quantize_symmetric(x, bits), quant.quantize_symmetric(x, bits, (0, 1)),
          quant.quantize_affine(x, bits, x.min(), x.max())]
  outs += [quant.quantize_weight(x, bits, mode) for mode in quant.WEIGHT_MODES]
  for out in outs:
    out = np.asarray(out)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, x, rtol=1e-6)  # a constant is representable
    if value == 0.0:
      np.testing.assert_array_equal(out, 0.0)


def test_32_bits_is_exact_float():
  x = np.random.default_rng(1).normal(size=(4, 5)).astype(F32) * 1e3
  for out in [quant.quantize_symmetric(x, 32), quant.quantize_affine(x, 32, -1.0, 1.0),
              jit_symmetric(x, jnp.int32(32), (0,)), jit_affine(x, jnp.int32(32), -1.0, 1.0)]:
    np.testing.assert_array_equal(np.asarray(out), x)
  for mode in quant.WEIGHT_MODES:
    np.testing.assert_array_equal(np.asarray(jit_weight(x, jnp.int32(32), mode)), x)


def test_binary_one_bit():
  x = np.array([[-2.0, 0.0, 1.0], [4.0, -1.0, 3.0]], F32)
  np.testing.assert_allclose(quant.quantize_symmetric(x, 1), np.sign(x) * (11.0 / 6.0))
  per_channel = quant.quantize_weight(x, 1, "symmetric_per_channel")  # channels = columns
  np.testing.assert_allclose(per_channel, np.sign(x) * np.array([3.0, 0.5, 2.0], F32))


def test_tiny_tensors_do_not_give_nan():
  # max|x| / qmax underflows to a flushed subnormal (0) for |x| < ~1e-36 on XLA:CPU.
  x = np.array([1e-37, -5e-38, 0.0], F32)
  for bits in (2, 8):
    assert np.all(np.isfinite(np.asarray(quant.quantize_symmetric(x, bits))))
    assert np.all(np.isfinite(np.asarray(quant.quantize_affine(x, bits, x.min(), x.max()))))


# ----------------------------------------------------------------------------- STE gradients


@pytest.mark.parametrize("mode", quant.WEIGHT_MODES)
@pytest.mark.parametrize("bits", [1, 2, 8, 32])
def test_weight_ste_gradient_is_identity(mode, bits):
  rng = np.random.default_rng(2)
  w = rng.normal(size=(3, 3, 2, 4)).astype(F32)
  g = rng.normal(size=w.shape).astype(F32)
  grad = jax.grad(lambda w: jnp.sum(quant.quantize_weight(w, bits, mode) * g))(w)
  np.testing.assert_allclose(grad, g, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 8])
def test_activation_ste_gradient_is_zero_outside_range(bits):
  x = np.linspace(-3.0, 3.0, 61).astype(F32)
  g = np.arange(1.0, 62.0, dtype=F32)
  lo, hi = -1.0, 2.0
  grad = jax.grad(lambda x: jnp.sum(quant.quantize_affine(x, bits, lo, hi) * g))(x)
  np.testing.assert_array_equal(grad, np.where((x >= lo) & (x <= hi), g, 0.0))
  grad32 = jax.grad(lambda x: jnp.sum(quant.quantize_affine(x, 32, lo, hi) * g))(x)
  np.testing.assert_array_equal(grad32, g)
  # dynamic ranges: everything is inside, the gradient is the identity
  ctx = _context(a_bits=jnp.array([bits]))
  grad_dyn = jax.grad(lambda x: jnp.sum(ctx.quantize_input(x, 0) * g))(x)
  np.testing.assert_array_equal(grad_dyn, g)


def test_prune_gradient_reaches_kept_weights_only():
  w = np.array([0.1, -3.0, 0.5, 2.0], F32)
  grad = jax.grad(lambda w: jnp.sum(quant.prune(w, 0.5) * jnp.arange(1.0, 5.0)))(w)
  np.testing.assert_array_equal(grad, np.array([0, 2, 0, 4], F32))


# ----------------------------------------------------------------------------- pruning

# Integer-valued weights make ties (and zeros) common.
tie_weights = hnp.arrays(F32, hnp.array_shapes(min_dims=1, max_dims=4, max_side=6),
                         elements=st.integers(-3, 3).map(float))
jit_prune = jax.jit(quant.prune)


@settings(deadline=None, max_examples=40)
@given(w=st.one_of(tie_weights, arrays), keep=st.floats(float(F32(0.001)), 1.0, width=32))
def test_prune_keeps_exactly_round_n_keep(w, keep):
  mask, k = np_prune_mask(w, keep)
  expected = np.where(mask, w, F32(0))
  ranks = quant.magnitude_ranks(w)
  assert int(np.sum(np.asarray(ranks) < k)) == k
  assert int(quant.keep_count(w.size, keep)) == k
  np.testing.assert_array_equal(quant.prune(w, keep), expected)
  np.testing.assert_array_equal(jit_prune(w, F32(keep)), expected)  # traced keep
  np.testing.assert_array_equal(jit_prune(w, F32(keep), ranks), expected)  # precomputed
  np.testing.assert_array_equal(np.sort(np.asarray(ranks).reshape(-1)), np.arange(w.size))


@settings(deadline=None, max_examples=40)
@given(w=arrays, data=st.data())
def test_prune_keep_m_over_n_keeps_m(w, data):
  m = data.draw(st.integers(1, w.size))
  kept = quant.magnitude_ranks(w) < quant.keep_count(w.size, F32(m / w.size))
  assert int(np.sum(np.asarray(kept))) == m


def test_prune_ties_are_broken_by_index():
  w = np.array([1.0, -2.0, 2.0, 1.0, -1.0, 0.0], F32)
  np.testing.assert_array_equal(quant.magnitude_ranks(w), [2, 0, 1, 3, 4, 5])
  np.testing.assert_array_equal(quant.prune(w, 0.5), [1.0, -2.0, 2.0, 0, 0, 0])
  # round half to even: 6 * 0.25 = 1.5 -> 2; 10 * 0.25 = 2.5 -> 2
  assert int(quant.keep_count(6, 0.25)) == 2 and int(quant.keep_count(10, 0.25)) == 2


def test_context_prunes_then_quantizes_kernel():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(3, 3, 4, 8)).astype(F32)
  ctx = _context(w_bits=jnp.array([4, 8]), keep=0.4)
  mask, _ = np_prune_mask(w, 0.4)
  expected, step = np_symmetric(np.where(mask, w, 0), 4, (0, 1, 2))
  assert_quantized(ctx.quantize_kernel(jnp.asarray(w), 0), expected, step, np.where(mask, w, 0))
  ranks = tuple(quant.magnitude_ranks(w) for _ in range(2))
  ctx_ranked = _context(w_bits=jnp.array([4, 8]), keep=0.4, prune_ranks=ranks)
  np.testing.assert_array_equal(ctx_ranked.quantize_kernel(jnp.asarray(w), 0),
                                ctx.quantize_kernel(jnp.asarray(w), 0))


# ----------------------------------------------------------------------------- activations


def test_dynamic_and_calibrated_activation_ranges():
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(2, 5, 5, 3)) * 2 + 0.5).astype(F32)
  bits = jnp.array([4, 6])
  dynamic = _context(a_bits=bits)
  expected, scale = np_affine(x, 6, x.min(), x.max())
  assert_quantized(dynamic.quantize_input(jnp.asarray(x), 1), expected, scale, x)
  # calibrated with the batch's own min/max: identical to dynamic
  lo, hi = np.array([-9.0, x.min()], F32), np.array([9.0, x.max()], F32)
  calibrated = _context(a_bits=bits, calibration=(lo, hi))
  np.testing.assert_array_equal(calibrated.quantize_input(jnp.asarray(x), 1),
                                dynamic.quantize_input(jnp.asarray(x), 1))
  # a narrower calibrated range clips
  narrow = _context(a_bits=bits, calibration=(np.array([-1.0, -1.0], F32),
                                              np.array([1.0, 1.0], F32)))
  out = np.asarray(narrow.quantize_input(jnp.asarray(x), 0))
  expected, scale = np_affine(x, 4, -1.0, 1.0)
  assert_quantized(out, expected, scale, x)
  assert out.max() <= 1.0 + scale / 2 + 1e-6 and out.min() >= -1.0 - scale / 2 - 1e-6


def test_observe_records_input_ranges_and_float_context_is_identity():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 6, 6, 3)).astype(F32)
  conv, dense = QConv(4), QDense(3)
  conv_vars = conv.init(jax.random.key(0), x)
  observed = []

  def observe(x, q):  # a calibration observer: records each quantizer's input range
    observed.append((jnp.min(x), jnp.max(x)))
    return x

  ctx = QContext(quantize_input=observe)
  y = conv.apply(conv_vars, x, ctx)
  np.testing.assert_array_equal(y, conv.apply(conv_vars, x))  # no bits: float
  flat = np.asarray(y).reshape(2, -1)
  dense_vars = dense.init(jax.random.key(1), flat)
  dense.apply(dense_vars, flat, ctx)
  assert ctx.num_layers == 2
  (lo0, hi0), (lo1, hi1) = observed
  assert (float(lo0), float(hi0)) == (x.min(), x.max())
  assert (float(lo1), float(hi1)) == (flat.min(), flat.max())


def test_bad_weight_mode_is_named():
  with pytest.raises(ValueError, match="per_chanel.*symmetric_per_channel"):
    quant.quantize_weight(np.ones((2, 2), F32), 4, "symmetric_per_chanel")
  with pytest.raises(ValueError, match="weight_quant"):
    QContext.from_config(QuantConfig.uniform(1), spec=QuantSpec(weight_quant="nope"))
