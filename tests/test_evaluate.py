"""Tests of calibration and population evaluation (nemo_jax/_src/evaluation.py)."""

from __future__ import annotations

import importlib.util
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nemo_jax import evaluation
from nemo_jax._src import data as data_lib
from nemo_jax._src.checkpoint import load_default_model
from nemo_jax._src.layers import QContext, QDense
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.spec import QuantSpec

SPEC = QuantSpec(weight_quant="symmetric_per_channel")
NNCF = SPEC.replace(placement="nncf")

_spec = importlib.util.spec_from_file_location(
    "_multihost_worker", os.path.join(os.path.dirname(__file__), "_multihost_worker.py"))
worker = sys.modules.get("_multihost_worker")
if worker is None:  # registered: flax dataclasses look their module up
  worker = sys.modules["_multihost_worker"] = importlib.util.module_from_spec(_spec)
  _spec.loader.exec_module(worker)


def ptq_evaluator(model, variables, calibration, images, labels, **kwargs):
  """The NEMO (calibrated PTQ) evaluator."""
  return evaluation.Evaluator(model, variables, evaluation.ptq_scheme(calibration, SPEC), images,
                              labels, **kwargs)


@pytest.fixture(scope="module")
def problem():
  return worker.build_problem(seed=0)


@pytest.fixture(scope="module")
def map_evaluator(problem):
  model, variables, calibration, images, labels, _ = problem
  return ptq_evaluator(model, variables, calibration, images, labels,
                            batch_size=worker.BATCH_SIZE, strategy="map")


def _numpy_metrics(logits, labels):
  """Independent top-1 / top-5 / mean NLL from float64 numpy."""
  logits = np.asarray(logits, np.float64)
  k = min(5, logits.shape[1])
  order = np.argsort(-logits, axis=1, kind="stable")
  top1 = np.mean(order[:, 0] == labels)
  top5 = np.mean(np.any(order[:, :k] == labels[:, None], axis=1))
  shifted = logits - logits.max(axis=1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  loss = -np.mean(logp[np.arange(len(labels)), labels])
  return top1, top5, loss


# --------------------------------------------------------------------------- calibration


class TinyMLP(nn.Module):
  """x -> QDense(6) -> relu -> QDense(3): layer inputs are computable in numpy."""

  @nn.compact
  def __call__(self, x, ctx=None, train=False):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(QDense(6)(x, ctx))
    return QDense(3)(x, ctx)


@settings(max_examples=8, deadline=None)
@given(batch_size=st.integers(1, 9), num_batches=st.one_of(st.none(), st.integers(1, 3)),
       seed=st.integers(0, 100))
def test_calibration_is_mean_of_per_batch_min_max(batch_size, num_batches, seed):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(25, 2, 2, 1)).astype(np.float32) * 3
  model = TinyMLP()
  variables = model.init(jax.random.key(seed), jnp.asarray(images[:1]))
  calib = evaluation.calibrate(model, variables, images, batch_size=batch_size,
                             num_batches=num_batches)
  # Brute force: layer inputs in numpy, per-batch min/max, mean over batches.
  p = jax.tree.map(np.asarray, variables["params"])
  w0, b0 = p["QDense_0"]["kernel"], p["QDense_0"]["bias"]
  starts = list(range(0, len(images), batch_size))[:num_batches]
  mins, maxs = [], []
  for s in starts:
    x0 = images[s:s + batch_size].reshape(-1, 4).astype(np.float64)
    x1 = np.maximum(x0 @ w0 + b0, 0)
    mins.append([x0.min(), x1.min()])
    maxs.append([x0.max(), x1.max()])
  assert calib.num_batches == len(starts)
  np.testing.assert_allclose(calib.lo, np.mean(mins, axis=0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(calib.hi, np.mean(maxs, axis=0), rtol=1e-5, atol=1e-6)


def test_calibration_save_load_and_cache(tmp_path, problem):
  model, variables, calibration, images, _, _ = problem
  path = tmp_path / "calib.json"
  evaluation.save_calibration(path, calibration)
  loaded = evaluation.load_calibration(path)
  np.testing.assert_array_equal(loaded.lo, calibration.lo)  # float32 round-trips exactly
  np.testing.assert_array_equal(loaded.hi, calibration.hi)
  assert (loaded.num_batches, loaded.fingerprint) == (calibration.num_batches,
                                                      calibration.fingerprint)
  # Cache hit: a file whose fingerprint matches is returned as is (doctored values).
  evaluation.save_calibration(path, calibration.replace(lo=calibration.lo - 1.0))
  hit = evaluation.load_or_calibrate(path, model, variables, images, batch_size=worker.BATCH_SIZE)
  np.testing.assert_array_equal(hit.lo, calibration.lo - 1.0)
  # Other images: fingerprint differs -> recomputed and rewritten.
  miss = evaluation.load_or_calibrate(path, model, variables, images[:20],
                                    batch_size=worker.BATCH_SIZE)
  expected = evaluation.calibrate(model, variables, images[:20], batch_size=worker.BATCH_SIZE)
  np.testing.assert_array_equal(miss.lo, expected.lo)
  np.testing.assert_array_equal(evaluation.load_calibration(path).hi, expected.hi)
  (tmp_path / "bad.json").write_text('{"format": "other"}')
  with pytest.raises(ValueError, match="format"):
    evaluation.load_calibration(tmp_path / "bad.json")


# --------------------------------------------------------------------------- evaluation


def test_population_matches_per_config_reference(problem, map_evaluator):
  """Evaluator == a plain loop of model.apply(QContext.from_config) on all images."""
  model, variables, calibration, images, labels, configs = problem
  result = map_evaluator(configs)
  apply = jax.jit(lambda v, x, w, a, k: model.apply(
      v, x, QContext.from_config(QuantConfig(w, a, k), calibration, spec=SPEC), train=False))
  for p in range(configs.w_bits.shape[0]):
    logits = apply(variables, jnp.asarray(images), configs.w_bits[p], configs.a_bits[p],
                   configs.keep[p])
    top1, top5, loss = _numpy_metrics(logits, labels)
    assert result.top1[p] == np.float32(top1)
    assert result.top5[p] == np.float32(top5)
    np.testing.assert_allclose(result.loss[p], loss, rtol=2e-5)
  assert result.top1.dtype == np.float32 and result.top1.shape == (configs.w_bits.shape[0],)


def test_float_config_gives_exactly_float_accuracy(problem, map_evaluator):
  model, variables, _, images, labels, _ = problem
  num_layers = map_evaluator.num_layers
  float_cfg = QuantConfig(w_bits=jnp.full((3, num_layers), 32, jnp.int32),
                          a_bits=jnp.full((3, num_layers), 32, jnp.int32),
                          keep=jnp.ones((3,), jnp.float32))
  result = map_evaluator(float_cfg)
  ref = map_evaluator.evaluate_float()
  np.testing.assert_array_equal(result.top1, np.full(3, ref.top1))
  np.testing.assert_array_equal(result.top5, np.full(3, ref.top5))
  np.testing.assert_array_equal(result.loss, np.full(3, ref.loss))
  logits = model.apply(variables, jnp.asarray(images), None, train=False)
  top1, top5, loss = _numpy_metrics(logits, labels)
  assert ref.top1 == np.float32(top1) and ref.top5 == np.float32(top5)
  np.testing.assert_allclose(ref.loss, loss, rtol=2e-5)


def test_strategies_and_chunking_agree(problem, map_evaluator):
  """vmap == lax.map == chunked vmap (chunks of 3 over 8 padded members: a remainder)."""
  model, variables, calibration, images, labels, configs = problem
  reference = map_evaluator(configs)
  for strategy, chunk in (("vmap", None), ("chunked_vmap", 3)):
    ev = ptq_evaluator(model, variables, calibration, images, labels,
                            batch_size=worker.BATCH_SIZE, strategy=strategy, chunk_size=chunk)
    assert ev.chunk_size_for(8) == (8 if chunk is None else chunk)
    result = ev(configs)
    np.testing.assert_array_equal(result.top1, reference.top1, err_msg=strategy)
    np.testing.assert_array_equal(result.top5, reference.top5, err_msg=strategy)
    np.testing.assert_allclose(result.loss, reference.loss, rtol=1e-5, err_msg=strategy)


def test_padding_and_single_member(problem, map_evaluator):
  _, _, _, _, _, configs = problem
  assert ([map_evaluator.padded_size(p) for p in (1, 2, 3, 5, 8, 9, 17, 100)]
          == [1, 2, 4, 8, 8, 16, 24, 104])
  full = map_evaluator(configs)
  # Member 3 alone (no population axis) and inside a padded population of 3.
  single = map_evaluator(jax.tree.map(lambda v: v[3], configs))
  sub = map_evaluator(jax.tree.map(lambda v: v[2:5], configs))
  assert single.top1.shape == (1,) and sub.top1.shape == (3,)
  assert single.top1[0] == full.top1[3] and single.loss[0] == full.loss[3]
  np.testing.assert_array_equal(sub.top1, full.top1[2:5])
  model, variables, calibration, images, labels, _ = worker.build_problem(0)
  fixed = ptq_evaluator(model, variables, calibration, images, labels, population_pad=4)
  assert [fixed.padded_size(p) for p in (1, 4, 5, 9)] == [4, 4, 8, 12]


def test_nonfinite_logits_give_nan_not_crash(problem):
  """An extreme range makes the 2-bit activation quantizer produce NaN (inf * 0).

  The range is put on the classifier's input: a NaN earlier in the network can be
  turned into 0 by a later ReLU (XLA:CPU's vectorised max), which is a finite result.
  """
  model, variables, calibration, images, labels, _ = problem
  lo = np.asarray(calibration.lo).copy()
  hi = np.asarray(calibration.hi).copy()
  lo[-1], hi[-1] = -3e38, 3e38  # hi - lo overflows: scale = inf
  extreme = calibration.replace(lo=jnp.asarray(lo), hi=jnp.asarray(hi))
  ev = ptq_evaluator(model, variables, extreme, images, labels,
                          batch_size=worker.BATCH_SIZE, strategy="map")
  num_layers = ev.num_layers
  a_bits = np.full((2, num_layers), 32, np.int32)
  a_bits[0, -1] = 2
  result = ev(QuantConfig(w_bits=jnp.full((2, num_layers), 8, jnp.int32),
                          a_bits=jnp.asarray(a_bits), keep=jnp.ones((2,), jnp.float32)))
  assert np.isnan(result.top1[0]) and np.isnan(result.top5[0]) and np.isnan(result.loss[0])
  assert np.all(np.isfinite([result.top1[1], result.top5[1], result.loss[1]]))


def test_top5_with_fewer_than_five_classes():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(11, 2, 2, 1)).astype(np.float32)
  labels = rng.integers(0, 3, 11)
  model = TinyMLP()
  variables = model.init(jax.random.key(1), jnp.asarray(images[:1]))
  calib = evaluation.calibrate(model, variables, images, batch_size=4)
  ev = ptq_evaluator(model, variables, calib, images, labels, batch_size=4)
  assert ev.top_k == 3 and ev.batch_size == 4  # 3 balanced batches of 4 (1 padded row)
  result = ev(QuantConfig.uniform(2, 4, 4))
  assert result.top5[0] == 1.0
  logits = jax.jit(lambda v, x: model.apply(v, x, QContext.from_config(
      QuantConfig.uniform(2, 4, 4), calib, spec=SPEC), train=False))(variables, jnp.asarray(images))
  assert result.top1[0] == np.float32(_numpy_metrics(logits, labels)[0])


def test_memory_formula_chunk_size(problem):
  model, variables, calibration, images, labels, _ = problem
  ev = ptq_evaluator(model, variables, calibration, images, labels,
                          batch_size=worker.BATCH_SIZE, strategy="vmap")
  # SmallNet on 10x10x1: kernels 3*3*(1*8 + 8*8 + 8*8 + 8*16) + 16*10; the peak layer is
  # a 10x10x8 -> 10x10x8 conv; batch 13 (37 images in 3 balanced batches).
  weights = 9 * (8 + 64 + 64 + 128) + 160
  assert ev.num_weights == weights and ev.peak_activation == 1600 and ev.batch_size == 13
  per_member = 4 * (2 * weights + evaluation.ACTIVATION_FACTOR * 13 * 1600)
  assert ev.member_bytes == per_member
  ev.memory_budget = 3 * per_member + 1
  assert ev.chunk_size_for(8) == 3 and ev.chunk_size_for(2) == 2
  ev.memory_budget = 1
  assert ev.chunk_size_for(8) == 1


def test_bad_input_raises_value_error(problem, map_evaluator):
  model, variables, calibration, images, labels, configs = problem
  num_layers = map_evaluator.num_layers
  with pytest.raises(ValueError, match="w_bits.*shape"):
    map_evaluator(QuantConfig.uniform(num_layers + 1, 8, 8))
  with pytest.raises(ValueError, match=r"a_bits\[0, 2\].*40"):
    a = np.full((1, num_layers), 8)
    a[0, 2] = 40
    map_evaluator(QuantConfig(jnp.full((1, num_layers), 8), jnp.asarray(a), jnp.ones(1)))
  with pytest.raises(ValueError, match="keep"):
    map_evaluator(configs.replace(keep=jnp.zeros_like(configs.keep)))
  with pytest.raises(ValueError, match="strategy"):
    ptq_evaluator(model, variables, calibration, images, labels, strategy="pmap")
  with pytest.raises(ValueError, match="labels"):
    ptq_evaluator(model, variables, calibration, images, labels[:-1])
  with pytest.raises(ValueError, match="calibration"):
    ptq_evaluator(model, variables, calibration.replace(lo=calibration.lo[:-1],
                                                        hi=calibration.hi[:-1]),
                  images, labels)
  with pytest.raises(ValueError, match="num_batches"):
    evaluation.calibrate(model, variables, images, batch_size=16, num_batches=4)


def test_all_2_bit_collapses_default_model():
  model, variables = load_default_model()
  x_train, _ = data_lib.load_split("fashion_mnist_embedded", "train")
  x_test, y_test = data_lib.load_split("fashion_mnist_embedded", "test")
  subset = data_lib.stratified_subset(y_test, 20, seed=0)  # 200 test images
  calib = evaluation.calibrate(model, variables,
                             data_lib.preprocess("fashion_mnist_embedded", x_train[:512]),
                             batch_size=256)
  ev = ptq_evaluator(model, variables, calib, x_test[subset], y_test[subset],
                          preprocess=lambda x: data_lib.preprocess("fashion_mnist_embedded", x))
  float_top1 = ev.evaluate_float().top1
  result = ev(QuantConfig(w_bits=jnp.asarray([[8] * ev.num_layers, [2] * ev.num_layers]),
                          a_bits=jnp.asarray([[8] * ev.num_layers, [2] * ev.num_layers]),
                          keep=jnp.ones((2,), jnp.float32)))
  assert float_top1 > 0.8, f"float top-1 {float_top1}: the default model is not trained"
  assert result.top1[0] > float_top1 - 0.05, f"8-bit top-1 {result.top1[0]} vs {float_top1}"
  assert result.top1[1] < 0.5 * float_top1, f"all-2-bit top-1 {result.top1[1]} did not collapse"


def test_nncf_placement_shares_quantizers_and_matches_a_plain_apply():
  """One calibrated range per tensor; the evaluator equals model.apply(QContext(nncf))."""
  from nemo_jax import models
  rng = np.random.default_rng(3)
  model = models.get_model("resnet20", (12, 12, 1), 10)
  variables = models.init_variables(model, jax.random.key(3), (12, 12, 1))
  images = rng.normal(size=(24, 12, 12, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 24)
  calib = evaluation.calibrate(model, variables, images, batch_size=8, placement="nncf")
  # 22 layers read 20 tensors (2 block inputs are shared with a downsample conv), plus
  # 11 residual-add inputs (9 block outputs, 2 downsample outputs).
  assert calib.num_layers == 31
  # ... and the first block's input (read by conv1, also the identity) has ONE range:
  # the range of the stem's output, which the conv_inputs calibration gives layer 1.
  plain = evaluation.calibrate(model, variables, images, batch_size=8)
  assert calib.lo[1] == plain.lo[1] and calib.hi[1] == plain.hi[1]
  ev = evaluation.Evaluator(model, variables, evaluation.ptq_scheme(calib, NNCF),
                            images, labels, batch_size=8, strategy="map")
  assert (ev.num_layers, ev.num_act_quantizers) == (22, 31)
  configs = QuantConfig(w_bits=jnp.asarray(rng.integers(2, 9, (3, 22)), jnp.int32),
                        a_bits=jnp.asarray(rng.integers(2, 9, (3, 31)), jnp.int32),
                        keep=jnp.ones((3,), jnp.float32))
  result = ev(configs)
  apply = jax.jit(lambda w, a: model.apply(
      variables, jnp.asarray(images),
      QContext.from_config(QuantConfig(w, a, 1.0), calib, spec=NNCF), train=False))
  for p in range(3):
    top1, _, loss = _numpy_metrics(apply(configs.w_bits[p], configs.a_bits[p]), labels)
    assert result.top1[p] == np.float32(top1)
    np.testing.assert_allclose(result.loss[p], loss, rtol=2e-5)
  # The FP32 configuration is the float model.
  logits = model.apply(variables, jnp.asarray(images), None, train=False)
  assert ev.evaluate_float().top1 == np.float32(_numpy_metrics(logits, labels)[0])
  with pytest.raises(ValueError, match="a_bits.*31 bit-widths"):
    ev(QuantConfig.uniform(22, 8, 8))
  with pytest.raises(ValueError, match="calibration: 22 activation ranges.*31 activation quantizers"):
    evaluation.Evaluator(model, variables, evaluation.ptq_scheme(plain, NNCF),
                         images, labels)
