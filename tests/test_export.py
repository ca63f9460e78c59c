"""Export: packed integers (bit-exact against the evaluator's fake-quantized kernels, size =
the model-size objective), ONNX QDQ run by onnxruntime against the JAX forward pass, CLI."""

from __future__ import annotations

import json
import math
import os

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemo_jax import cli
from nemo_jax import export
from nemo_jax._src import calibration as calib_lib
from nemo_jax._src import models as models_lib
from nemo_jax._src import quant
from nemo_jax._src import schemes
from nemo_jax._src import tables as tables_lib
from nemo_jax._src.costs.registry import compute_costs
from nemo_jax._src.costs.report import layer_costs_numpy
from nemo_jax._src.evaluator import member_logits
from nemo_jax._src.precision import config_from_dict
from nemo_jax._src.problem import fitness_data
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.run.rundir import RunDir
from nemo_jax._src.spec import QuantSpec

ort = pytest.importorskip("onnxruntime")


# ONNX vs JAX tolerance (docs/DESIGN.md, "Export"). Both compute the same quantizers, but
# convolutions / sums accumulate in another order (~1e-6 relative); an activation that
# lands that close to a rounding boundary flips by one step and the step propagates. So:
# most images agree to float noise, none differs grossly and the predictions agree.
FLOAT_NOISE = 1e-4        # x max|logit|: an image "agrees" (no rounding flip reached it)
AGREEING_IMAGES = 0.5     # at least this fraction of the images agrees
GROSS = 0.1               # x max|logit|: no image differs more
GROSS_COARSE = 0.25       # ... for a member with an activation below 4 bits, where one
                          # flipped step is a third (2 bits) or a seventh (3 bits) of
                          # that tensor's range
TOP1_AGREEMENT = 0.9


def _agreement(onnx_logits, jax_logits) -> dict:
  scale = float(np.abs(jax_logits).max())
  per_image = np.abs(onnx_logits - jax_logits).max(axis=1)
  return {"max_abs_diff": float(per_image.max()), "logit_scale": scale,
          "agreeing": float(np.mean(per_image <= FLOAT_NOISE * scale)),
          "top1": float(np.mean(onnx_logits.argmax(1) == jax_logits.argmax(1)))}


def _agrees(a: dict, min_act_bits: int = 8) -> bool:
  gross = GROSS if min_act_bits >= 4 else GROSS_COARSE
  return (a["agreeing"] >= AGREEING_IMAGES and a["max_abs_diff"] <= gross * a["logit_scale"]
          and a["top1"] >= TOP1_AGREEMENT)


def _onnx_logits(proto, images):
  options = ort.SessionOptions()
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  session = ort.InferenceSession(proto.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
  return session.run(None, {"images": np.asarray(images, np.float32)})[0]


# --------------------------------------------------------------------------- packing


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.integers(1, 32), st.integers(0, 40)), min_size=1,
                           max_size=6), st.integers(0, 2**31))
def test_pack_unpack_round_trip(layers, seed):
  rng = np.random.default_rng(seed)
  bits = [b for b, _ in layers]
  codes = [rng.integers(0, 2**b, size=n, dtype=np.uint64) for b, n in layers]
  packed, offsets = export.pack_codes(codes, bits)
  total = sum(b * n for b, n in layers)
  assert packed.dtype == np.uint8 and packed.size == math.ceil(total / 8)
  assert offsets[-1] == total
  for i, (c, b) in enumerate(zip(codes, bits)):
    np.testing.assert_array_equal(export.unpack_codes(packed, offsets[i], c.size, b), c)


def test_pack_is_msb_first_and_rejects_codes_too_wide():
  packed, _ = export.pack_codes([np.asarray([5, 1, 7])], [3])   # 101 001 111 -> 10100111 1
  np.testing.assert_array_equal(packed, [0b10100111, 0b10000000])
  with pytest.raises(ValueError, match="does not fit 3 bits"):
    export.pack_codes([np.asarray([8])], [3])


@pytest.mark.parametrize("mode", quant.WEIGHT_MODES)
@pytest.mark.parametrize("weight_range", quant.WEIGHT_RANGES)
@pytest.mark.parametrize("clipped", [False, True])
def test_weight_integers_reproduce_the_fake_quantizer(mode, weight_range, clipped):
  w = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
  w = w.at[0, 0, 0, :].set(0.0)
  clip = None
  if clipped:  # a per-channel / per-tensor clip ratio (MSE calibration tables)
    clip = jnp.linspace(0.5, 1.0, 8) if mode.endswith("per_channel") else jnp.float32(0.7)

  @jax.jit
  def both(bits):
    q, scale, zp = quant.weight_integers(w, bits, mode, weight_range, clip)
    return q, (q - zp) * scale, quant.quantize_weight(w, bits, mode, weight_range, clip)

  for bits in (1, 2, 3, 8, 13, 31):
    q, dequantized, fake = (np.asarray(v) for v in both(jnp.int32(bits)))
    np.testing.assert_array_equal(q, np.round(q))
    assert np.abs(q).max() <= 2**bits
    np.testing.assert_array_equal(dequantized, fake)


# --------------------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, make_run_dir):
  """A run directory (``conftest.write_run_dir``): uniform W8A8, pruned mixed, W4A4."""
  return make_run_dir(str(tmp_path_factory.mktemp("run")))


def _member_config(problem, entry):
  configs = problem.configs([entry["keep"]], [entry["w_bits"]], [entry["a_bits"]])
  return jax.tree.map(lambda x: x[0], configs)


def test_npz_is_the_fake_quantized_model_bit_for_bit_and_its_size_is_model_bits(run_dir,
                                                                                tmp_path):
  out_dir, problem, front = run_dir
  wl = problem.workload
  for k, entry in enumerate(front):
    path = str(tmp_path / f"m{k}.npz")
    info = export.export_member(out_dir, k, format="npz", out=path)
    config = _member_config(problem, entry)
    # Independent reading of the file (numpy only) vs the evaluator's kernels.
    side, kernels = export.load_npz_kernels(path)
    prepared = problem.scheme.prepare(problem.model, problem.source.variables,
                                      problem.source.input_shape)
    _, ref = jax.jit(lambda p, c: schemes.member_weights(problem.scheme, p, c))(prepared,
                                                                               config)
    assert len(kernels) == wl.num_layers
    for i, (got, want) in enumerate(zip(kernels, ref)):
      assert np.array_equal(got, np.asarray(want)), (k, i, wl.layer_names[i])
    # The packed bytes are the project's size objective.
    weight_bits = float(layer_costs_numpy(wl, entry["w_bits"], entry["a_bits"],
                                          entry["keep"])["weight_bits"].sum())
    with np.load(path) as z:
      packed = z["weights_packed"]
      floats = sum(z[n].size for n in z.files if n.startswith("float/params/"))
    assert packed.size == math.ceil(weight_bits / 8) == info["sizes"]["packed_weight_bytes"]
    model_bits = weight_bits + 32 * floats
    assert floats == wl.total_params - int(wl.weights.sum())
    assert info["sizes"]["model_bits"] == model_bits
    assert info["sizes"]["model_bytes"] == packed.size + 4 * floats
    costs = compute_costs(wl, config)
    np.testing.assert_allclose(model_bits, float(costs["model_bits"]), rtol=1e-6)
    np.testing.assert_allclose(model_bits / (32 * wl.total_params),
                               entry["metrics"]["model_ratio"], rtol=1e-6)
    # Masks: exactly round(N * keep) kept weights per pruned layer.
    for layer in side["layers"]:
      assert layer["masked"] == (entry["keep"] < 1)
      if layer["masked"]:
        assert layer["kept"] == int(quant.keep_count(layer["weights"], entry["keep"]))
    # The precision JSON is a loadable config of the same member.
    assert side == json.loads(open(path + ".json").read())
    _, again = config_from_dict(side["config"])
    np.testing.assert_array_equal(again.w_bits, entry["w_bits"])
    np.testing.assert_array_equal(again.a_bits, entry["a_bits"])
    acts = side["activations"]
    calib = problem.calibration
    np.testing.assert_array_equal([a["lo"] for a in acts], np.asarray(calib.lo))
    np.testing.assert_array_equal([a["hi"] for a in acts], np.asarray(calib.hi))


def test_onnx_runtime_matches_the_fake_quantized_jax_forward(run_dir, tmp_path):
  out_dir, problem, front = run_dir
  run_cfg = RunDir(out_dir).read_config()
  x = fitness_data(problem.cfg, problem.seed, run_cfg.run.selection_per_class,
                   held_out=problem.held_out)[0]
  figures = {}
  for k in (0, 1):           # uniform W8A8, pruned mixed precision
    path = str(tmp_path / f"m{k}.onnx")
    info = export.export_member(out_dir, k, format="onnx", out=path)
    assert info["onnx_bytes"] == os.path.getsize(path)
    import onnx
    proto = onnx.load(path)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "MatMul"} <= ops
    config = _member_config(problem, front[k])
    want = member_logits(problem.model, problem.source.variables, problem.scheme, config, x)
    got = _onnx_logits(proto, x)
    figures[k] = _agreement(got, want)
    assert _agrees(figures[k], min(front[k]["a_bits"])), (k, front[k]["a_bits"], figures[k])
  print("resnet20 onnx vs jax:", figures)


# The zoo architectures at reduced depth (every op kind of the full model, a fraction of
# the layers: compiling dominates on CPU). Full depth at 32x32 gave the same agreement
# (max |diff| 1.6e-7 / 1.2e-6 for mobilenet_v2 / resnet18, mixed bits, keep 0.8).
REDUCED = {
    "mobilenet_v2": dict(width_mult=0.5, inverted_residual_setting=(
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2))),
    "resnet18": dict(stage_sizes=(1, 2), stage_planes=(16, 32), stem_features=16),
    "resnet20": dict(stage_sizes=(1, 1, 1)),
}


def _random_model_case(name, shape, w_bits, a_bits, keep, seed=0,
                       weight_quant="symmetric_per_channel", library=False,
                       weight_range=None, act_quant="affine", calibration="minmax"):
  model = models_lib.get_model(name, input_shape=shape, num_classes=10, **REDUCED[name])
  variables = models_lib.init_variables(model, jax.random.key(seed), shape)
  # Non-trivial BatchNorm statistics (init is mean 0, var 1).
  rng = np.random.default_rng(seed)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: (np.abs(rng.normal(1.0, 0.3, v.shape)).astype(np.float32)
                    if "var" in jax.tree_util.keystr(p) else
                    rng.normal(0, 0.1, v.shape).astype(np.float32)
                    if "mean" in jax.tree_util.keystr(p) else np.asarray(v)), variables)
  images = rng.normal(size=(8, *shape)).astype(np.float32)
  if library:   # EMOMC: a one-entry library, FP16 activations
    scheme = schemes.library([1.0], QuantSpec(weight_quant=weight_quant,
                                              activation_format="fp16"))
    variables = schemes.stack_variables([variables])
  else:
    calib = calib_lib.calibrate(model, variables, images, batch_size=4)
    spec = QuantSpec(weight_quant=weight_quant, weight_range=weight_range,
                     act_quant=act_quant, calibration=calibration)
    tables = tables_lib.compute_tables(spec, model, variables, images,
                                       [1, 2, 3, 4, 6, 8, 12], calib, 4)
    scheme = schemes.ptq(calib, spec, tables=tables)
  layers, acts = models_lib.trace_quantizers(model, shape)
  config = QuantConfig(w_bits=jnp.asarray(w_bits(len(layers)), jnp.int32),
                       a_bits=jnp.asarray(a_bits(len(acts)), jnp.int32),
                       keep=jnp.float32(keep))
  prepared = scheme.prepare(model, variables, shape)
  member = export.quantize_member(model, variables, scheme, config, shape, prepared)
  want = member_logits(model, variables, scheme, config, images, prepared=prepared)
  return model, member, want, images


@pytest.mark.parametrize("name, weight_quant, library, settings", [
    ("mobilenet_v2", "symmetric_per_channel", False, {}),
    ("resnet18", "asymmetric_per_tensor", False, {}),
    ("resnet20", "asymmetric_per_channel", True, {}),
    ("resnet20", "symmetric_per_channel", False,
     {"weight_range": "full", "act_quant": "symmetric", "calibration": "mse"}),
    ("resnet20", "asymmetric_per_channel", False,
     {"weight_range": "narrow", "calibration": "percentile"}),
    ("resnet20", "asymmetric_per_channel", False, {"calibration": "adaround"}),
])
def test_onnx_runtime_matches_jax_on_random_zoo_models(name, weight_quant, library, settings):
  rng = np.random.default_rng(1)
  choices = [1, 2, 3, 4, 6, 8, 12, 32]
  model, member, want, images = _random_model_case(
      name, (32, 32, 3) if name != "resnet20" else (12, 12, 1),
      lambda n: rng.choice(choices, n), lambda n: rng.choice(choices, n),
      1.0 if library else 0.8, weight_quant=weight_quant, library=library, **settings)
  assert any(l.info.op == "depthwise" for l in member.layers) == (name == "mobilenet_v2")
  assert {l.bits for l in member.layers} & {1, 12, 32}
  got = _onnx_logits(export.to_onnx(model, member), images)
  a = _agreement(got, want)
  print(name, weight_quant, "library" if library else "ptq", "onnx vs jax:", a)
  assert _agrees(a), a


def test_a_wrong_activation_scale_is_caught():
  """The agreement check can fail: one activation scale off by one level (``/ 2^b``)."""
  model, member, want, images = _random_model_case(
      "resnet20", (12, 12, 1), lambda n: [6] * n, lambda n: [6] * n, 1.0)
  assert _agrees(_agreement(_onnx_logits(export.to_onnx(model, member), images), want))
  member.activations[1].scale *= (2**6 - 1) / 2**6
  assert not _agrees(_agreement(_onnx_logits(export.to_onnx(model, member), images), want))


# --------------------------------------------------------------------------- CLI


def test_cli_export_writes_the_file_and_reports_sizes(run_dir, tmp_path, capsys):
  out_dir, _, _ = run_dir
  path = str(tmp_path / "cli.npz")
  code = cli.main(["export", out_dir, "--member", "2", "--out", path])
  printed = json.loads(capsys.readouterr().out)
  assert code == 0 and os.path.exists(path) and os.path.exists(path + ".json")
  assert printed["file_bytes"] == os.path.getsize(path)
  assert printed["packed_weight_bytes"] < printed["model_bytes"] < printed["file_bytes"]


@pytest.mark.parametrize("argv, words", [
    (["--member", "3"], ["member=3", "0..2"]),
    (["--member", "-1"], ["member=-1"]),
    (["--member", "0", "--format", "tflite"], ["format", "npz", "onnx"]),
])
def test_cli_export_bad_input_exits_2(run_dir, tmp_path, capsys, argv, words):
  out_dir, _, _ = run_dir
  code = cli.main(["export", out_dir, *argv, "--out", str(tmp_path / "x.npz")])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
  assert "Traceback" not in err
  for w in words:
    assert w in err
  assert not os.path.exists(tmp_path / "x.npz")


def test_cli_export_missing_run_dir_exits_2(tmp_path, capsys):
  for target in (tmp_path / "nothing", tmp_path):
    code = cli.main(["export", str(target), "--member", "0", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "run_dir" in err
