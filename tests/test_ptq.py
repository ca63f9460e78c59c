"""Quantizer schemes and calibration tables (``tables.py``) against numpy references.

MSE clipping finds the grid optimum (brute force), percentile ranges are numpy's, bias
correction removes the mean output error of a layer (numpy convolution) to 1e-5, table
lookups fall back to minmax, the evaluator compiles once for many configurations, and
the tables are cached by fingerprint.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemo_jax._src import calibration as calib_lib
from nemo_jax._src import quant
from nemo_jax._src import schemes
from nemo_jax._src import tables as tables_lib
from nemo_jax._src.evaluator import Evaluator
from nemo_jax._src.layers import QConv, QDense
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.run.config import load_search_config
from nemo_jax._src.spec import QuantSpec

F32 = np.float32
SPEC = QuantSpec(weight_quant="symmetric_per_channel")


class Tiny(nn.Module):
  """Strided padded conv -> relu -> conv -> mean -> dense: 3 layers, small."""

  @nn.compact
  def __call__(self, x, ctx=None, train=False):
    x = nn.relu(QConv(6, kernel_size=3, strides=2)(x, ctx))
    x = nn.relu(QConv(5, kernel_size=3, use_bias=True)(x, ctx))
    return QDense(3)(jnp.mean(x, axis=(1, 2)), ctx)


@pytest.fixture(scope="module")
def tiny():
  model = Tiny()
  rng = np.random.default_rng(0)
  images = rng.normal(0.3, 1.0, (12, 7, 7, 2)).astype(F32)
  variables = model.init(jax.random.key(0), images[:1])
  labels = rng.integers(0, 3, 12)
  return model, variables, images, labels


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value, words", [
    ("weight_range", "wide", "weight_range='wide'.*narrow.*full"),
    ("act_quant", "signed", "act_quant='signed'.*affine.*symmetric"),
    ("calibration", "adaroundd", "calibration='adaroundd'.*minmax.*percentile.*mse.*output_mse"),
])
def test_bad_quantizer_fields_are_named(field, value, words):
  with pytest.raises(ValueError, match=words):
    load_search_config("experiments/configs/smoke.py", **{field: value})


def test_act_quant_needs_integer_activations_and_library_needs_minmax():
  with pytest.raises(ValueError, match="act_quant='symmetric'.*activation_format"):
    load_search_config("experiments/configs/smoke.py", act_quant="symmetric",
                       activation_format="fp16", quantize_activations=False)
  with pytest.raises(ValueError, match="calibration='mse'.*library"):
    load_search_config("experiments/configs/smoke.py", calibration="mse", library="lib",
                       activation_format="fp16", quantize_activations=False)


def test_quantizer_fields_are_recorded_and_paper_config_is_affine():
  cfg = load_search_config("experiments/configs/smoke.py", weight_range="full",
                           act_quant="symmetric", calibration="mse_bias_correction")
  d = cfg.flat_dict()
  assert (d["weight_range"], d["act_quant"], d["calibration"]) == (
      "full", "symmetric", "mse_bias_correction")
  default = load_search_config()
  assert (default.weight_quant, default.weight_range, default.act_quant,
          default.calibration) == ("asymmetric_per_channel", None, "affine", "minmax")
  paper = load_search_config("experiments/configs/paper_imagenet.py")
  assert (paper.weight_quant, paper.act_quant) == ("asymmetric_per_channel", "affine")


# --------------------------------------------------------------------------- weights


def np_quantize_weight(w, bits, mode, clip):
  """numpy reference of the clipped weight quantizers (narrow symmetric / full asym.)."""
  axes = tuple(range(w.ndim - 1)) if mode.endswith("per_channel") else None
  if mode.startswith("symmetric"):
    qmax = F32(2 ** (bits - 1) - 1)
    amax = (np.max(np.abs(w), axis=axes, keepdims=True) * clip).astype(F32)
    step = np.where(amax > 0, amax / qmax, F32(1)).astype(F32)
    return (np.clip(np.round(w / step), -qmax, qmax) * step).astype(F32)
  lo = np.minimum(np.min(w, axis=axes, keepdims=True) * clip, 0).astype(F32)
  hi = np.maximum(np.max(w, axis=axes, keepdims=True) * clip, 0).astype(F32)
  qmax = F32(2 ** bits - 1)
  scale = np.where(hi > lo, (hi - lo) / qmax, F32(1)).astype(F32)
  zp = np.round(-lo / scale)
  return ((np.clip(np.round(w / scale) + zp, 0, qmax) - zp) * scale).astype(F32)


@pytest.mark.parametrize("mode", ["symmetric_per_channel", "asymmetric_per_channel",
                                  "symmetric_per_tensor"])
def test_mse_weight_clip_is_the_grid_optimum(mode):
  rng = np.random.default_rng(1)
  # heavy tails: clipping helps at low bits
  w = (rng.standard_t(2.5, (3, 3, 4, 5)) * 0.1).astype(F32)
  grid = np.asarray(tables_lib.CLIP_GRID, F32)
  bits = [2, 3, 8]
  got = np.asarray(tables_lib.mse_weight_clip(w, jnp.asarray(bits), QuantSpec(weight_quant=mode)))
  axes = tuple(range(w.ndim - 1)) if mode.endswith("per_channel") else None
  for j, b in enumerate(bits):
    errors = np.stack([np.sum((np_quantize_weight(w, b, mode, a) - w) ** 2, axis=axes)
                       for a in grid])                      # [G, C] or [G]
    best = errors.min(axis=0)
    chosen = np.asarray([np.sum((np_quantize_weight(w, b, mode, got[j]) - w) ** 2,
                                axis=axes)]).reshape(best.shape)
    np.testing.assert_allclose(chosen, best, rtol=2e-5)   # optimal on the grid
    # ties go to the largest ratio: the first grid point within float error of the best
    first = grid[np.argmax(errors <= best * (1 + 2e-5), axis=0)]
    np.testing.assert_array_equal(got[j], first)
  assert np.all(got[0] < 1.0)                               # 2 bits: clipping helps
  if mode.startswith("symmetric"):   # 1 bit symmetric is binary: no range to clip
    binary = np.asarray(tables_lib.mse_weight_clip(w, jnp.asarray([1]),
                                                          QuantSpec(weight_quant=mode)))
    np.testing.assert_array_equal(binary, 1.0)


def test_output_mse_clip_is_the_grid_optimum_of_the_layer_output_error(tiny):
  model, variables, images, _ = tiny
  bits = [2, 4]
  clips = tables_lib.output_mse_weight_clip(model, variables, images, jnp.asarray(bits), SPEC)
  assert [c.shape for c in clips] == [(2, 6), (2, 5), (2, 3)]
  w = np.asarray(variables["params"]["QConv_0"]["kernel"])
  y = np_conv(images, w, 2, 1)
  grid = np.asarray(tables_lib.OUTPUT_GRID, F32)
  for j, b in enumerate(bits):
    errors = np.stack([((np_conv(images, np_quantize_weight(w, b, "symmetric_per_channel", a),
                                 2, 1) - y) ** 2).mean(axis=(0, 1, 2)) for a in grid])
    chosen = np.asarray([errors[list(grid).index(c), k] for k, c in enumerate(clips[0][j])])
    np.testing.assert_allclose(chosen, errors.min(axis=0), rtol=1e-4)
  assert np.all(clips[0][0] <= 1.0) and np.any(clips[0][0] < 1.0)


def test_adaround_reconstructs_layer_outputs_better_than_nearest(tiny):
  model, variables, images, _ = tiny
  bits = [2, 3]
  ups = tables_lib.adaround(model, variables, images, jnp.asarray(bits), SPEC, steps=150)
  assert [u.shape[0] for u in ups] == [2, 2, 2] and ups[0].dtype == np.int8
  for j, b in enumerate(bits):
    nearest = tables_lib.reconstruction_errors(model, variables, images, b, SPEC)
    learned = tables_lib.reconstruction_errors(model, variables, images, b, SPEC,
                                               ups=[jnp.asarray(u[j]) for u in ups])
    # better in total, no layer worse (a layer whose hard rounding does not beat nearest
    # keeps nearest)
    assert sum(learned) < sum(nearest), (b, learned, nearest)
    assert all(l <= n * (1 + 1e-5) for l, n in zip(learned, nearest)), (b, learned, nearest)
    # the learned integers are floor or floor + 1 of the nearest grid
    w = np.asarray(variables["params"]["QConv_0"]["kernel"])
    q = np.asarray(quant.quantize_weight(w, b, up=jnp.asarray(ups[0][j])))
    qn = np.asarray(quant.quantize_weight(w, b))
    step = np.abs(w).max(axis=(0, 1, 2)) / (2 ** (b - 1) - 1)
    assert np.all(np.abs(q - qn) <= step * (1 + 1e-5))


# --------------------------------------------------------------------------- activations


def test_mse_and_percentile_activation_ranges_match_numpy():
  rng = np.random.default_rng(2)
  s = np.maximum(rng.standard_t(3, 4000), 0).astype(F32)   # ReLU output, long tail
  lo, hi = F32(s.min()), F32(s.max())
  bits = [2, 4, 8]
  got_lo, got_hi = (np.asarray(v) for v in tables_lib.mse_act_range(s, lo, hi,
                                                                    jnp.asarray(bits)))
  grid = np.asarray(tables_lib.CLIP_GRID, F32)
  for j, b in enumerate(bits):
    qmax = 2 ** b - 1
    def err(a):
      h = F32(a * hi)
      scale = F32(h / qmax)
      return np.mean((np.clip(np.round(s / scale), 0, qmax) * scale - s) ** 2)
    errors = np.asarray([err(a) for a in grid])
    assert err(got_hi[j] / hi) <= errors.min() * (1 + 1e-4)
    assert got_lo[j] == 0.0
  assert got_hi[0] < got_hi[1] < got_hi[2] <= hi           # fewer bits: tighter range
  p_lo, p_hi = tables_lib.percentile_range(s)
  assert p_lo == F32(np.percentile(s.astype(np.float64), 0.01))
  assert p_hi == F32(np.percentile(s.astype(np.float64), 99.99))


def test_table_lookup_falls_back_to_minmax_row():
  rows = tables_lib.table_row(jnp.asarray([2, 4, 8]), jnp.asarray([[2, 8, 32], [4, 5, 2]]))
  np.testing.assert_array_equal(rows, [[1, 3, 0], [2, 0, 1]])


# --------------------------------------------------------------------------- bias


def np_conv(x, w, stride, pad):
  """NHWC x HWIO cross-correlation with symmetric zero padding (numpy, float64)."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = w.shape[:2]
  oh = (x.shape[1] - kh) // stride + 1
  ow = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
  for i in range(oh):
    for j in range(ow):
      patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      out[:, i, j] = np.tensordot(patch, np.asarray(w, np.float64), axes=3)
  return out


def test_bias_correction_removes_the_mean_output_error(tiny):
  model, variables, images, _ = tiny
  patches = tables_lib.mean_patches(model, variables, images, batch_size=5)
  w = np.asarray(variables["params"]["QConv_0"]["kernel"])
  assert patches[0].shape == w.shape and len(patches) == 3
  wq = np.asarray(quant.quantize_weight(w, 2, "symmetric_per_channel"))
  y_float = np_conv(images, w, 2, 1)
  y_quant = np_conv(images, wq, 2, 1)
  error = (y_float - y_quant).mean(axis=(0, 1, 2))
  assert np.abs(error).max() > 1e-2                        # there is an error to remove
  delta = np.asarray(tables_lib.correction(patches[0], jnp.asarray(w), jnp.asarray(wq)))
  corrected = (y_quant + delta).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(corrected, y_float.mean(axis=(0, 1, 2)), atol=1e-5)


def test_bias_corrected_scheme_restores_layer_means_in_the_model(tiny):
  """Through the scheme: with float activations, the corrected 2-bit member's first layer
  output has the float layer's mean (the other layers see different inputs)."""
  model, variables, images, labels = tiny
  calib = calib_lib.calibrate(model, variables, images, batch_size=6)
  spec = SPEC.replace(calibration="bias_correction")
  tables = tables_lib.compute_tables(spec, model, variables, images, [2], calib, 6)
  scheme = schemes.ptq(calib, spec, tables=tables)
  prepared = scheme.prepare(model, variables, images.shape[1:])
  config = QuantConfig(w_bits=jnp.asarray([2, 32, 32]), a_bits=jnp.asarray([32, 32, 32]),
                       keep=jnp.float32(1.0))
  _, kernels = schemes.member_weights(scheme, prepared, config)
  on_output = scheme.member_outputs(prepared, config, kernels)
  w = np.asarray(variables["params"]["QConv_0"]["kernel"])
  y_quant = np_conv(images, np.asarray(kernels[0]), 2, 1)
  corrected = np.asarray(on_output(jnp.asarray(y_quant, jnp.float32), 0))
  np.testing.assert_allclose(corrected.mean(axis=(0, 1, 2)),
                             np_conv(images, w, 2, 1).mean(axis=(0, 1, 2)), atol=1e-5)
  # float layers (32 bits, unpruned): no correction
  y = jnp.ones((1, 4, 4, 5))
  np.testing.assert_array_equal(on_output(y, 1), y)


# --------------------------------------------------------------------------- evaluator


def test_evaluator_compiles_once_for_many_configs_with_tables(tiny):
  model, variables, images, labels = tiny
  calib = calib_lib.calibrate(model, variables, images, batch_size=6)
  spec = SPEC.replace(calibration="mse_bias_correction")
  tables = tables_lib.compute_tables(spec, model, variables, images, [2, 3, 4, 8], calib, 6)
  base = schemes.ptq(calib, spec, tables=tables)
  traces = []

  def member_pruned(prepared, config):
    traces.append(1)   # runs only while tracing
    return base.member_pruned(prepared, config)

  scheme = base._replace(member_pruned=member_pruned)
  ev = Evaluator(model, variables, scheme, images, labels, batch_size=6)
  rng = np.random.default_rng(0)
  results = []
  for _ in range(4):
    configs = QuantConfig(w_bits=rng.choice([2, 3, 4, 8, 32], (3, 3)),
                          a_bits=rng.choice([2, 3, 4, 8, 32], (3, 3)), keep=np.ones(3))
    results.append(ev(configs).loss)
  assert len(traces) == 1, len(traces)
  assert len(ev._compiled) == 1
  # the table lookup does change the result: mse differs from minmax at 2 bits
  minmax = Evaluator(model, variables, schemes.ptq(calib, SPEC), images, labels, batch_size=6)
  two = QuantConfig(w_bits=np.full((1, 3), 2), a_bits=np.full((1, 3), 2), keep=np.ones(1))
  assert ev(two).loss[0] != minmax(two).loss[0]
  # and bits outside the tables (32 = float) give the float model (no correction)
  fp = QuantConfig(w_bits=np.full((1, 3), 32), a_bits=np.full((1, 3), 32), keep=np.ones(1))
  np.testing.assert_array_equal(ev(fp).loss, minmax(fp).loss)


# --------------------------------------------------------------------------- cache


def test_tables_are_cached_by_fingerprint(tiny, tmp_path, monkeypatch):
  model, variables, images, _ = tiny
  monkeypatch.setenv("NEMO_JAX_CACHE_DIR", str(tmp_path))
  calib = calib_lib.calibrate(model, variables, images, batch_size=6)
  args = (None, SPEC.replace(calibration="mse"), model, variables, images, [2, 4], calib, 6)
  first = tables_lib.load_or_compute(*args)
  files = sorted(os.listdir(tmp_path / "calibration"))
  assert files == [f"{first.fingerprint}.tables.npz"]
  again = tables_lib.load_or_compute(*args)
  assert again.fingerprint == first.fingerprint
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  other = tables_lib.load_or_compute(None, SPEC.replace(calibration="mse", act_quant="symmetric"),
                                     model, variables, images, [2, 4], calib, 6)
  assert other.fingerprint != first.fingerprint
  assert len(os.listdir(tmp_path / "calibration")) == 2
  assert tables_lib.load_or_compute(None, SPEC, model, variables, images, [2], calib,
                                    6) is None
