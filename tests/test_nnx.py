"""Bring your own Flax NNX model (``_src/nnx_models.py``): an unedited ``nnx.Module``
through every stage.

References: the zoo ResNet-20 (an NNX ResNet-20 holding its weights gives bit-identical
logits, calibration and workload under a mixed pruned configuration), the module called
directly in inference mode, hand-counted MACs, onnxruntime, and the evaluator on the
fine-tuned state written back into a module.
"""

from __future__ import annotations

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nemo_jax
from nemo_jax import cli
from nemo_jax import data as data_lib
from nemo_jax import models
from nemo_jax._src import calibration as calib_lib
from nemo_jax._src import config_file
from nemo_jax._src import export as export_lib
from nemo_jax._src import graph as graph_lib
from nemo_jax._src import schemes
from nemo_jax._src import workload as workload_lib
from nemo_jax._src.evaluator import Evaluator, member_logits
from nemo_jax._src.layers import QContext
from nemo_jax._src.problem import fitness_data
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.run.members import export_member
from nemo_jax._src.spec import QuantSpec

SPEC = QuantSpec(weight_quant="symmetric_per_channel")
SHAPE = (28, 28, 1)


def _images(n, seed=0, shape=SHAPE):
  return jnp.asarray(np.random.RandomState(seed).rand(n, *shape), jnp.float32)


def _numpy(tree):
  """Arrays (PRNG keys as their data) as numpy, for comparisons."""
  return jax.tree.map(lambda a: np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(
      a.dtype, jax.dtypes.prng_key) else a), tree)


def _abstract(build):
  """The module without running its initialisers (its weights are written next)."""
  return nnx.eval_shape(build)


# --------------------------------------------------------------------------- ResNet-20


def _bn(c, rngs):
  return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, use_fast_variance=False, rngs=rngs)


class Block(nnx.Module):
  """torchvision BasicBlock in NNX (option-B shortcut), names as the zoo's."""

  def __init__(self, cin, planes, strides, rngs):
    self.conv1 = nnx.Conv(cin, planes, (3, 3), strides, padding=1, use_bias=False, rngs=rngs)
    self.bn1 = _bn(planes, rngs)
    self.conv2 = nnx.Conv(planes, planes, (3, 3), 1, padding=1, use_bias=False, rngs=rngs)
    self.bn2 = _bn(planes, rngs)
    self.shortcut = strides != 1 or cin != planes
    if self.shortcut:
      self.downsample_conv = nnx.Conv(cin, planes, (1, 1), strides, padding=0,
                                      use_bias=False, rngs=rngs)
      self.downsample_bn = _bn(planes, rngs)

  def __call__(self, x):
    out = nnx.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x
    if self.shortcut:
      identity = self.downsample_bn(self.downsample_conv(x))
    return nnx.relu(out + identity)


class ResNet20(nnx.Module):
  """A user's CIFAR ResNet-20 in NNX, without QConv / QDense or ctx."""

  def __init__(self, rngs, channels=1, classes=10):
    self.conv1 = nnx.Conv(channels, 16, (3, 3), padding=1, use_bias=False, rngs=rngs)
    self.bn1 = _bn(16, rngs)
    cin = 16
    for s, planes in enumerate((16, 32, 64)):
      for b in range(3):
        setattr(self, f"layer{s + 1}_{b}", Block(cin, planes, 2 if s and not b else 1, rngs))
        cin = planes
    self.fc = nnx.Linear(64, classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    for s in range(3):
      for b in range(3):
        x = getattr(self, f"layer{s + 1}_{b}")(x)
    return self.fc(jnp.mean(x, axis=(1, 2)))


def test_nnx_resnet20_with_the_zoo_weights_is_bit_identical_to_the_zoo():
  zoo, variables = models.load_default_model()
  net = models.nnx_update(_abstract(lambda: ResNet20(nnx.Rngs(0))), variables)
  user = models.intercept(net)
  assert jax.tree.structure(user.variables) == jax.tree.structure(variables)
  x = jnp.asarray(data_lib.preprocess("fashion_mnist_embedded",
                                      data_lib.load_split("fashion_mnist_embedded", "test")[0][:6]))
  v = user.variables
  assert np.array_equal(np.asarray(user.apply(v, x)), np.asarray(zoo.apply(variables, x)))
  cal_user = calib_lib.calibrate(user, v, x, batch_size=3)
  cal_zoo = calib_lib.calibrate(zoo, variables, x, batch_size=3)
  assert np.array_equal(cal_user.lo, cal_zoo.lo) and np.array_equal(cal_user.hi, cal_zoo.hi)
  rng = np.random.RandomState(1)
  config = QuantConfig(w_bits=jnp.asarray(rng.randint(2, 9, 22)),
                       a_bits=jnp.asarray(rng.randint(2, 9, 22)), keep=0.6)

  def run(model, v, x):
    return model.apply(v, x, QContext.from_config(config, (cal_zoo.lo, cal_zoo.hi), spec=SPEC))

  out_user = np.asarray(jax.jit(lambda v, x: run(user, v, x))(v, x))
  out_zoo = np.asarray(jax.jit(lambda v, x: run(zoo, v, x))(variables, x))
  assert np.array_equal(out_user, out_zoo)
  assert not np.allclose(out_zoo, np.asarray(zoo.apply(variables, x)))   # quantized, pruned
  wl_user = workload_lib.extract_workload(user, SHAPE, 10)
  wl_zoo = workload_lib.extract_workload("resnet20", SHAPE, 10)
  a, b = workload_lib.workload_to_json(wl_user), workload_lib.workload_to_json(wl_zoo)
  assert a.pop("model") == "ResNet20" and b.pop("model") == "resnet20"
  assert a == b
  for edges in ("sequential", "dataflow"):
    g1, g2 = (graph_lib.workload_graph(w, edges=edges) for w in (wl_user, wl_zoo))
    for x1, x2 in zip(g1, g2):
      assert np.array_equal(x1, x2)
  models.check_intercepted(user, v, SHAPE)
  print("nnx resnet20 vs zoo: logits max |diff| 0 (float and mixed W/A 2..8 keep 0.6), "
        f"{len(cal_zoo.lo)} calibration ranges equal, workload JSON equal")


# --------------------------------------------------------------------------- mixed layers


class Mixed(nnx.Module):
  """Every handled layer type, BatchNorm, LayerNorm, dropout, attention, a positional
  parameter, a residual add; ``__call__`` NEEDS its ``train`` flag."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(1, 8, (4, 4), strides=4, padding="VALID", rngs=rngs)     # 7x7x8
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.up = nnx.ConvTranspose(8, 8, (3, 3), strides=(2, 2), rngs=rngs)           # 14x14x8
    self.dw = nnx.Conv(8, 8, (3, 3), strides=2, feature_group_count=8, rngs=rngs)  # 7x7x8
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 49, 8)))
    self.ln1 = nnx.LayerNorm(8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(8, rngs=rngs)
    self.mlp = nnx.Linear(8, 8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x, *, train):
    x = nnx.relu(self.bn(self.stem(x), use_running_average=not train))
    x = self.dw(self.up(x))
    t = x.reshape(x.shape[0], -1, 8) + self.pos[...]
    t = t + self.attn(self.ln1(t), deterministic=not train)
    t = t + self.drop(self.mlp(self.ln2(t)), deterministic=not train)
    return self.head(jnp.mean(t, axis=1))


@pytest.fixture(scope="module")
def mixed():
  module = Mixed(nnx.Rngs(0))
  # Non-trivial BatchNorm statistics.
  module.bn.mean[...] = jnp.linspace(-0.2, 0.2, 8)
  module.bn.var[...] = jnp.linspace(0.5, 1.5, 8)
  return module, models.intercept(module)


def test_float_call_is_the_module_in_inference_mode_and_the_module_is_not_edited(mixed):
  module, wrapped = mixed
  before = _numpy(nnx.state(module))
  classes = {p: type(m) for p, m in nnx.iter_modules(module)}
  x = _images(3, 1) * 3
  ref = np.asarray(nnx.jit(lambda m, x: m(x, train=False))(module, x))
  L = len(models.trace_layers(wrapped, SHAPE, wrapped.variables))
  assert L == 9      # stem, up, dw, q, k, v, out, mlp, head
  fp32 = QuantConfig(w_bits=jnp.full(L, 32), a_bits=jnp.full(L, 32), keep=1.0)
  for fn in (lambda v, x: wrapped.apply(v, x), lambda v, x: wrapped.apply(v, x, QContext()),
             lambda v, x: wrapped.apply(v, x, QContext.from_config(fp32, spec=SPEC))):
    assert np.array_equal(np.asarray(jax.jit(fn)(wrapped.variables, x)), ref)
  # A configuration changes the output; the module's state and classes are untouched.
  config = QuantConfig(w_bits=jnp.full(L, 3), a_bits=None, keep=0.5)
  out = jax.jit(lambda v, x: wrapped.apply(v, x, QContext.from_config(config, spec=SPEC)))(
      wrapped.variables, x)
  assert not np.allclose(np.asarray(out), ref)
  after = _numpy(nnx.state(module))
  assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
  assert {p: type(m) for p, m in nnx.iter_modules(module)} == classes
  assert models.intercept(wrapped) is wrapped
  with pytest.raises(ValueError, match="flax.linen.Module or a flax.nnx.Module"):
    models.intercept(lambda x: x)


def test_mixed_model_workload(mixed):
  _, wrapped = mixed
  wl = workload_lib.extract_workload(wrapped, SHAPE, 10, "conv_inputs")
  assert wl.model_name == "Mixed"
  assert wl.layer_names == ("stem", "up", "dw", "attn/query", "attn/key", "attn/value",
                            "attn/out", "mlp", "head")
  assert wl.ops[:3] == ("conv", "conv", "depthwise")
  # conv 4x4x1x8 on 7x7 outputs; transpose 3x3x8x8 over 7x7 inputs; depthwise 3x3x1x8 on
  # 7x7; q/k/v 8x(2x4) and out (2x4)x8 over 49 tokens; mlp 8x8 over 49 tokens; head 8x10.
  assert wl.macs.tolist() == [16 * 8 * 49, 9 * 64 * 49, 9 * 8 * 49] + [64 * 49] * 5 + [80]
  assert wl.total_params == sum(np.size(a) for a in jax.tree.leaves(wrapped.variables["params"]))
  q, k, val, out, mlp = 3, 4, 5, 6, 7
  edges = set(map(tuple, wl.layer_edges.tolist()))
  assert {(2, q), (2, k), (2, val), (q, out), (k, out), (val, out), (out, mlp)} <= edges
  graph = graph_lib.workload_graph(wl, edges="dataflow")
  assert graph.nodes.shape[0] == 2 * wl.num_layers and np.isfinite(graph.nodes).all()
  nncf = workload_lib.extract_workload(wrapped, SHAPE, 10, "nncf")
  assert nncf.input_quantizer[q] == nncf.input_quantizer[k] == nncf.input_quantizer[val]
  models.check_intercepted(wrapped, wrapped.variables, SHAPE)   # attention, pos, norms pass


def test_one_compile_for_every_configuration_of_a_population(mixed):
  _, wrapped = mixed
  images, labels = _images(12, 2), np.arange(12) % 10
  calib = calib_lib.calibrate(wrapped, wrapped.variables, images, batch_size=6)
  base = schemes.ptq(calib, SPEC)
  traces = []

  def member_pruned(prepared, config):
    traces.append(1)   # runs only while tracing
    return base.member_pruned(prepared, config)

  ev = Evaluator(wrapped, wrapped.variables, base._replace(member_pruned=member_pruned),
                 images, labels, batch_size=6)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(3):
    configs = QuantConfig(w_bits=rng.choice([2, 4, 8, 32], (4, 9)),
                          a_bits=rng.choice([2, 4, 8, 32], (4, 9)),
                          keep=rng.choice([0.5, 1.0], 4).astype(np.float32))
    losses.append(np.asarray(ev(configs).loss))
  assert len(traces) == 1 and len(ev._compiled) == 1
  assert len({tuple(l) for l in losses}) == 3      # the configurations did change the scores
  # The vmapped population (the accelerators' strategy) merges the copy under vmap.
  vmapped = Evaluator(wrapped, wrapped.variables, base, images, labels, batch_size=6,
                      strategy="vmap")
  np.testing.assert_allclose(np.asarray(vmapped(configs).loss), losses[-1], rtol=1e-5)


# --------------------------------------------------------------------------- errors


class RawDot(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), strides=4, rngs=rngs)
    self.w = nnx.Param(jnp.zeros((4, 10)))

  def __call__(self, x):
    return jnp.mean(self.conv(x), axis=(1, 2)) @ self.w[...]


class WithEinsum(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([nnx.Conv(1, 4, (3, 3), strides=4, rngs=rngs)])
    self.head = nnx.Einsum("nc,ck->nk", (4, 10), rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.mean(self.blocks[0](x), axis=(1, 2)))


class TransposedKernel(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.ConvTranspose(1, 4, (3, 3), transpose_kernel=True, rngs=rngs)

  def __call__(self, x):
    return jnp.mean(self.up(x), axis=(1, 2))


def test_parameters_outside_handled_layers_are_named():
  for build, attr, kind in ((RawDot, r"model\.w \(nnx\.Param", "RawDot"),
                            (WithEinsum, r"model\.head\.kernel \(nnx\.Param", "Einsum")):
    model, variables = models.quantizable(build(nnx.Rngs(0)))
    with pytest.raises(ValueError, match=attr + f".*type {kind}.*nnx.Linear.*nnx.LinearGeneral"):
      models.check_intercepted(model, variables, SHAPE)
  model, variables = models.quantizable(TransposedKernel(nnx.Rngs(0)))
  with pytest.raises(ValueError, match="up: nnx.ConvTranspose with transpose_kernel=True"):
    models.trace_layers(model, SHAPE, variables)
  model = models.intercept(RawDot(nnx.Rngs(0)))
  with pytest.raises(ValueError, match="missing: \\['params/w'\\]"):
    model.variables_from({"params": {"conv": model.variables["params"]["conv"]}})


# --------------------------------------------------------------------------- search


class SmallCNN(nnx.Module):
  """A user's CNN: BatchNorm (flag-driven), a residual add, max-pool."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), strides=2, rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x, train=False):
    x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    x = x + nnx.relu(self.bn2(self.conv2(x), use_running_average=not train))
    x = nnx.max_pool(x, (2, 2), (2, 2))
    return self.head(jnp.mean(x, axis=(1, 2)))


SEARCH = {"eval_per_class": 2, "calib_per_class": 2, "calib_batches": 2,
          "selection_per_class": 2, "final_max_images": 20, "population": 8, "generations": 1,
          "species": [{"kind": "direct_round"}, {"kind": "gcn", "hidden": 8},
                      {"kind": "graph_unet", "hidden": 8}],
          "edges": "dataflow", "min_species_size": 2, "archive_size": 32, "seed": 0}


def _fashion(split, per_class):
  images, labels = data_lib.load_split("fashion_mnist_embedded", split)
  idx = data_lib.stratified_subset(labels, per_class, seed=0)
  return data_lib.preprocess("fashion_mnist_embedded", images[idx]), labels[idx]


def test_search_and_resume_with_an_nnx_model_and_in_memory_data(tmp_path):
  module = SmallCNN(nnx.Rngs(0))
  data = {"train": _fashion("train", 6), "test": _fashion("test", 2)}
  cfg = nemo_jax.load_search_config(dict(SEARCH, model="custom", dataset="arrays",
                                         input_shape=SHAPE, num_classes=10))
  problem = nemo_jax.build_problem(cfg, model=module, data=data, progress=False)
  assert problem.workload.layer_names == ("conv1", "conv2", "head")
  assert problem.workload.model_name == "SmallCNN"
  x_eval, y_eval, _ = fitness_data(cfg.problem, cfg.seed, cfg.selection_per_class, problem.data)
  module.eval()
  ref = np.mean(np.argmax(np.asarray(module(x_eval)), -1) == y_eval)
  assert float(problem.evaluator.evaluate_float().top1) == pytest.approx(ref, abs=1e-7)
  out = str(tmp_path / "run")
  first = nemo_jax.search(SEARCH, out_dir=out, model=module, data=data, progress=False,
                          problem=problem)
  assert len(first.history) == 2 and first.front
  assert os.path.exists(os.path.join(out, "sensitivity.json"))
  resumed = nemo_jax.search(SEARCH, out_dir=out, resume=True, model=module, data=data,
                            progress=False, problem=problem, generations=2)
  assert len(resumed.history) == 3 and [r["generation"] for r in resumed.history] == [0, 1, 2]
  assert resumed.front and all(len(m["w_bits"]) == 3 and "final_top1" in m
                               for m in resumed.front)
  saved = json.loads(open(os.path.join(out, "config.json")).read())["config"]
  assert saved["problem"]["model"] == "custom"
  # An explicit state (here: BatchNorm statistics changed) replaces the module's own.
  variables = jax.tree.map(lambda a: a, models.intercept(module).variables)
  variables["batch_stats"]["bn1"]["var"] = variables["batch_stats"]["bn1"]["var"] * 4
  other = nemo_jax.build_problem(cfg, model=module, variables=variables, data=data,
                                 progress=False)
  assert np.array_equal(other.source.variables["batch_stats"]["bn1"]["var"],
                        variables["batch_stats"]["bn1"]["var"])
  assert (float(other.evaluator.evaluate_float().loss)
          != float(problem.evaluator.evaluate_float().loss))


# --------------------------------------------------------------------------- factory


FACTORY = '''
import jax.numpy as jnp
from flax import nnx

class SmallCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), strides=2, rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x, train=False):
    x = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
    x = x + nnx.relu(self.bn2(self.conv2(x), use_running_average=not train))
    x = nnx.max_pool(x, (2, 2), (2, 2))
    return self.head(jnp.mean(x, axis=(1, 2)))

class RawHead(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), strides=2, rngs=rngs)
    self.w = nnx.Param(jnp.zeros((4, 10)))

  def __call__(self, x):
    return jnp.mean(self.conv(x), axis=(1, 2)) @ self.w[...]

def make_model():
  model = SmallCNN(nnx.Rngs(0))
  model.bn2.mean[...] = jnp.full((8,), 0.1)
  model.bn2.var[...] = jnp.full((8,), 2.0)
  return model

def make_pair():
  return make_model(), None

def make_bad():
  return RawHead(nnx.Rngs(0))
'''


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
  path = tmp_path_factory.mktemp("factory") / "my_nnx_models.py"
  path.write_text(textwrap.dedent(FACTORY))
  return str(path)


@pytest.fixture(scope="module")
def nnx_run(tmp_path_factory, factory, make_run_dir):
  """A run directory of the NNX factory model (W8A8, pruned mixed, W4A4, W2A2 members)."""
  out = str(tmp_path_factory.mktemp("nnx_run"))
  return make_run_dir(out, model=f"{factory}:make_model", lowest=True)


def test_cli_layers_and_bad_factory(factory, tmp_path, capsys):
  for attr in ("make_model", "make_pair"):
    assert cli.main(["layers", f"{factory}:{attr}", "--input-shape", "28,28,1"]) == 0
    layers = json.loads(capsys.readouterr().out)
    assert layers["model"] == "SmallCNN"
    assert [(l["name"], l["macs"]) for l in layers["layers"]] == [
        ("conv1", 9 * 8 * 14 * 14), ("conv2", 9 * 64 * 14 * 14), ("head", 80)]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(dict(SEARCH, model=f"{factory}:make_bad")))
  assert cli.main(["search", "--config", str(bad), "--out", str(tmp_path / "b"), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: model: parameter model.w (nnx.Param") and "type RawHead" in err


def test_export_npz_and_onnx_of_an_nnx_member(nnx_run, tmp_path):
  ort = pytest.importorskip("onnxruntime")
  out, problem, front = nnx_run
  assert problem.workload.layer_names == ("conv1", "conv2", "head")
  x = fitness_data(problem.cfg, problem.seed, 4)[0]
  for k in (1, 2):        # pruned mixed precision, uniform W4A4
    entry = front[k]
    config = jax.tree.map(lambda a: a[0], problem.configs([entry["keep"]], [entry["w_bits"]],
                                                          [entry["a_bits"]]))
    npz = str(tmp_path / f"m{k}.npz")
    export_member(out, k, format="npz", out=npz)
    _, kernels = export_lib.load_npz_kernels(npz)
    prepared = problem.scheme.prepare(problem.model, problem.source.variables, SHAPE)
    _, ref = jax.jit(lambda p, c: schemes.member_weights(problem.scheme, p, c))(prepared, config)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(kernels, ref))
    path = str(tmp_path / f"m{k}.onnx")
    export_member(out, k, format="onnx", out=path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": np.asarray(x, np.float32)})[0]
    want = member_logits(problem.model, problem.source.variables, problem.scheme, config, x)
    scale = float(np.abs(want).max())
    per_image = np.abs(got - want).max(axis=1)
    assert np.mean(per_image <= 1e-4 * scale) >= 0.5 and per_image.max() <= 0.1 * scale
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.9
    print(f"nnx member {k} onnx vs jax: max |diff| {per_image.max():.3g} (logits {scale:.3g})")


def test_finetune_writes_the_nnx_state_back(nnx_run, factory):
  out, problem, front = nnx_run
  k = len(front) - 1     # W2A2
  (entry,) = nemo_jax.finetune_members(out, [k], epochs=1, progress=False, config={
      "max_images": 96, "batch_size": 32, "learning_rate": 1e-3})
  assert len(entry["epoch_loss"]) == 1 and np.isfinite(entry["epoch_loss"][0])
  make_model = config_file.resolve_object(f"{factory}:make_model", "model")
  start = make_model()
  tuned = models.nnx_update(make_model(), entry["variables"])
  wrapped = models.intercept(tuned)
  # The module now holds the fine-tuned state: its float call is the adapter's on the file.
  saved = jax.tree.map(np.asarray, wrapped.variables)
  x = _images(4, 3)
  tuned.eval()
  np.testing.assert_array_equal(np.asarray(tuned(x)),
                                np.asarray(wrapped.apply(wrapped.variables, x)))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), saved,
                         models.intercept(start).variables)
  assert changed["params"]["conv1"]["kernel"] and changed["batch_stats"]["bn1"]["mean"]
  # The fitness top-1 after fine-tuning is the evaluator's on the written-back module.
  run_cfg = nemo_jax.RunDir(out).read_config()
  x_fit, y_fit, _ = fitness_data(problem.cfg, problem.seed, run_cfg.run.selection_per_class)
  evaluator = Evaluator(wrapped, wrapped.variables, problem.scheme, x_fit, y_fit)
  configs = problem.configs([entry["keep"]], [entry["w_bits"]], [entry["a_bits"]])
  top1 = float(np.asarray(evaluator.run(configs).top1)[0])
  assert entry["fitness"]["after"]["top1"] == pytest.approx(top1, abs=1e-6)

