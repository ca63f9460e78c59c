"""Bring your own Flax model: interception of plain linen layers (``_src/intercept.py``).

References: the zoo ResNet-20 through QConv / QDense (bit-identical logits, calibration
and workload for the same variables), numpy re-implementations of the quantized
layers, flax's own layers on numpy-quantized kernels, and a direct float accuracy.
"""

from __future__ import annotations

import json
import os
import textwrap

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemo_jax
from nemo_jax import cli
from nemo_jax import data as data_lib
from nemo_jax import models
from nemo_jax._src import calibration as calib_lib
from nemo_jax._src import graph as graph_lib
from nemo_jax._src import models as zoo_lib
from nemo_jax._src import workload as workload_lib
from nemo_jax._src.layers import QContext
from nemo_jax._src.problem import fitness_data
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.spec import QuantSpec

SPEC = QuantSpec(weight_quant="symmetric_per_channel")

SHAPE = (28, 28, 1)


def _bn(train: bool, name: str):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      use_fast_variance=False, name=name)


class PlainBlock(nn.Module):
  """torchvision BasicBlock written with plain nn.Conv (option-B shortcut)."""
  planes: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train=False):
    out = nn.Conv(self.planes, (3, 3), self.strides, padding=1, use_bias=False,
                  name="conv1")(x)
    out = nn.relu(_bn(train, "bn1")(out))
    out = nn.Conv(self.planes, (3, 3), 1, padding=1, use_bias=False, name="conv2")(out)
    out = _bn(train, "bn2")(out)
    identity = x
    if self.strides != 1 or x.shape[-1] != self.planes:
      identity = nn.Conv(self.planes, (1, 1), self.strides, padding=0, use_bias=False,
                         name="downsample_conv")(x)
      identity = _bn(train, "downsample_bn")(identity)
    return nn.relu(out + identity)


class PlainResNet20(nn.Module):
  """A user's CIFAR ResNet-20, equal to the zoo's, without QConv / QDense or ctx."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False, name="conv1")(x)
    x = nn.relu(_bn(train, "bn1")(x))
    for s, planes in enumerate((16, 32, 64)):
      for b in range(3):
        x = PlainBlock(planes, 2 if s > 0 and b == 0 else 1, name=f"layer{s + 1}_{b}")(x, train)
    return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))


class Mixed(nn.Module):
  """Every handled layer type, plus LayerNorm, a positional parameter and attention."""

  @nn.compact
  def __call__(self, x, deterministic=True):
    x = nn.Conv(8, (4, 4), strides=4, padding="VALID")(x)                    # 7x7x8
    x = nn.ConvTranspose(8, (3, 3), strides=(2, 2))(x)                       # 14x14x8
    x = nn.Conv(8, (3, 3), strides=2, feature_group_count=8)(x)              # depthwise
    t = x.reshape(x.shape[0], -1, 8)                                         # 49 tokens
    t = t + self.param("pos", nn.initializers.normal(0.02), (1, t.shape[1], 8))
    t = t + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(t), deterministic=deterministic)
    t = t + nn.Dropout(0.1)(nn.Dense(8)(nn.LayerNorm()(t)), deterministic=deterministic)
    return nn.Dense(10)(jnp.mean(t, axis=1))


@pytest.fixture(scope="module")
def default_model():
  return models.load_default_model()


def _images(n, seed=0, shape=SHAPE):
  return jnp.asarray(np.random.RandomState(seed).rand(n, *shape), jnp.float32)


# --------------------------------------------------------------------------- identity


@pytest.fixture(scope="module")
def mixed():
  module = Mixed()
  variables = jax.jit(module.init)(jax.random.key(0), _images(1))
  wrapped = models.intercept(module)
  L = len(models.trace_layers(wrapped, SHAPE, variables))
  fns = {"plain": jax.jit(module.apply),
         "none": jax.jit(lambda v, x: wrapped.apply(v, x)),
         "float_ctx": jax.jit(lambda v, x: wrapped.apply(v, x, QContext())),
         "fp32_config": jax.jit(lambda v, x: wrapped.apply(v, x, QContext.from_config(
             QuantConfig(w_bits=jnp.full(L, 32), a_bits=jnp.full(L, 32), keep=1.0),
             spec=SPEC)))}
  return module, wrapped, variables, fns


@hypothesis.settings(deadline=None, max_examples=5, print_blob=False)
@hypothesis.given(st.integers(0, 2**31 - 1), st.floats(0.1, 50.0))
def test_float_context_is_bit_identical_to_plain_apply(mixed, seed, scale):
  module, wrapped, variables, fns = mixed
  x = _images(2, seed) * scale
  ref = np.asarray(fns["plain"](variables, x))
  for name in ("none", "float_ctx", "fp32_config"):
    assert np.array_equal(np.asarray(fns[name](variables, x)), ref), name


def test_float_identity_eager(mixed):
  module, wrapped, variables, _ = mixed
  x = _images(2, 5)
  assert np.array_equal(np.asarray(wrapped.apply(variables, x)),
                        np.asarray(module.apply(variables, x)))


def test_same_variables_and_no_extra_nesting(mixed):
  module, wrapped, variables, _ = mixed
  own = jax.eval_shape(wrapped.init, jax.random.key(0), _images(1))
  assert jax.tree.structure(own) == jax.tree.structure(variables)
  assert models.intercept(wrapped) is wrapped
  zoo = models.get_model("resnet20", input_shape=SHAPE, num_classes=10)
  assert models.intercept(zoo) is zoo            # already takes ctx: unchanged
  with pytest.raises(ValueError, match="train_arg"):
    models.intercept(module, train_arg="training")
  with pytest.raises(ValueError, match="flax.linen.Module"):
    models.intercept(lambda x: x)


def test_resnet20_written_with_nn_conv_is_bit_identical_to_the_zoo(default_model):
  zoo, variables = default_model
  user = models.intercept(PlainResNet20())
  x = jnp.asarray(data_lib.preprocess("fashion_mnist_embedded",
                                      data_lib.load_split("fashion_mnist_embedded", "test")[0][:6]))
  assert (jax.tree.structure(PlainResNet20().init(jax.random.key(0), x[:1])["params"])
          == jax.tree.structure(variables["params"]))
  assert np.array_equal(np.asarray(user.apply(variables, x)), np.asarray(zoo.apply(variables, x)))
  # The same calibration (observer context through both).
  cal_user = calib_lib.calibrate(user, variables, x, batch_size=3)
  cal_zoo = calib_lib.calibrate(zoo, variables, x, batch_size=3)
  assert np.array_equal(cal_user.lo, cal_zoo.lo) and np.array_equal(cal_user.hi, cal_zoo.hi)
  rng = np.random.RandomState(1)
  w_bits, a_bits = jnp.asarray(rng.randint(2, 9, 22)), jnp.asarray(rng.randint(2, 9, 22))

  def run(model, v, x):
    ctx = QContext.from_config(QuantConfig(w_bits=w_bits, a_bits=a_bits, keep=0.6),
                               (cal_zoo.lo, cal_zoo.hi), spec=SPEC)
    return model.apply(v, x, ctx)

  out_user = jax.jit(lambda v, x: run(user, v, x))(variables, x)
  out_zoo = jax.jit(lambda v, x: run(zoo, v, x))(variables, x)
  assert np.array_equal(np.asarray(out_user), np.asarray(out_zoo))
  assert not np.allclose(np.asarray(out_zoo), np.asarray(zoo.apply(variables, x)))  # quantized


# --------------------------------------------------------------------------- references


def _sym_per_tensor(w, bits):
  qmax = 2.0 ** (bits - 1) - 1
  step = np.abs(w).max() / qmax
  return np.clip(np.round(w / step), -qmax, qmax) * step


def test_dense_and_dense_general_match_numpy_quantization():
  class Heads(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral((2, 3), name="qkv")(x)                    # [N, T, 2, 3]
      return nn.DenseGeneral(5, axis=(-2, -1), name="out")(h)       # [N, T, 5]

  x = np.random.RandomState(0).randn(2, 4, 6).astype(np.float32)
  v = Heads().init(jax.random.key(1), x)
  wrapped = models.intercept(Heads())
  spec = QuantSpec(weight_quant="symmetric_per_tensor", activation_format="float32")
  ctx = lambda: QContext.from_config(QuantConfig(w_bits=jnp.asarray([3, 2]), a_bits=None,
                                                 keep=None), spec=spec)
  out = np.asarray(wrapped.apply(v, x, ctx()))
  p = jax.tree.map(np.asarray, v["params"])
  k1 = _sym_per_tensor(p["qkv"]["kernel"], 3)
  h = np.einsum("ntd,dhe->nthe", x, k1) + p["qkv"]["bias"]
  k2 = _sym_per_tensor(p["out"]["kernel"], 2)
  ref = np.einsum("nthe,hef->ntf", h, k2) + p["out"]["bias"]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # Workload of token dense layers: MACs = weights * tokens.
  infos = []
  jax.eval_shape(lambda v, x: wrapped.apply(v, x, QContext(on_layer=infos.append)), v,
                 jax.ShapeDtypeStruct(x.shape, jnp.float32))
  assert [(i.in_channels, i.out_channels, i.macs, i.in_hw) for i in infos] == [
      (6, 6, 6 * 6 * 4, (4, 1)), (6, 5, 6 * 5 * 4, (4, 1))]


def test_conv_transpose_and_pruning_match_flax_on_numpy_kernels():
  class Up(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.ConvTranspose(3, (3, 3), strides=(2, 2), name="up")(x)

  x = np.random.RandomState(2).randn(2, 5, 5, 4).astype(np.float32)
  v = Up().init(jax.random.key(3), x)
  k = np.asarray(v["params"]["up"]["kernel"])
  keep = 0.5
  order = np.argsort(-np.abs(k).ravel(), kind="stable")
  pruned = np.zeros(k.size, np.float32)
  kept = order[:int(np.round(k.size * keep))]
  pruned[kept] = k.ravel()[kept]
  ref = Up().apply({"params": {"up": {"kernel": _sym_per_tensor(pruned.reshape(k.shape), 4),
                                      "bias": v["params"]["up"]["bias"]}}}, x)
  ctx = QContext.from_config(
      QuantConfig(w_bits=jnp.asarray([4]), a_bits=None, keep=keep),
      spec=QuantSpec(weight_quant="symmetric_per_tensor", activation_format="float32"))
  out = models.intercept(Up()).apply(v, x, ctx)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_mixed_model_workload_counts(mixed):
  _, wrapped, variables, _ = mixed
  wl = workload_lib.extract_workload(wrapped, SHAPE, 10, "conv_inputs")
  assert wl.model_name == "Mixed"
  names = [n.split("/")[-1] for n in wl.layer_names]
  assert names == ["Conv_0", "ConvTranspose_0", "Conv_1", "query", "key", "value", "out",
                   "Dense_0", "Dense_1"]
  assert wl.ops[:3] == ("conv", "conv", "depthwise")
  # Hand counts: conv 4x4x1x8 on 7x7 outputs; transpose 3x3x8x8 over 7x7 inputs;
  # depthwise 3x3x1x8 on 7x7; q/k/v 8x(2x4) over 49 tokens; out (2x4)x8; dense 8x8; fc 8x10.
  assert wl.macs.tolist() == [16 * 8 * 49, 9 * 64 * 49, 9 * 8 * 49] + [64 * 49] * 4 + [
      64 * 49, 80]
  assert wl.total_params == zoo_lib.count_params(variables)
  graph = graph_lib.workload_graph(wl, edges="dataflow")
  assert graph.nodes.shape[0] == 2 * wl.num_layers and np.isfinite(graph.nodes).all()
  # q, k and v all read the LayerNorm output; the attention output reaches "out".
  q, k, val, out = 3, 4, 5, 6
  assert {(2, q), (2, k), (2, val)} <= set(map(tuple, wl.layer_edges.tolist()))
  assert {(q, out), (k, out), (val, out)} <= set(map(tuple, wl.layer_edges.tolist()))
  nncf = workload_lib.extract_workload(wrapped, SHAPE, 10, "nncf")
  assert nncf.input_quantizer[q] == nncf.input_quantizer[k] == nncf.input_quantizer[val]


def test_workload_equals_the_zoo_resnet20(default_model):
  user = models.intercept(PlainResNet20())
  wl_user = workload_lib.extract_workload(user, SHAPE, 10)
  wl_zoo = workload_lib.extract_workload("resnet20", SHAPE, 10)
  a, b = workload_lib.workload_to_json(wl_user), workload_lib.workload_to_json(wl_zoo)
  assert a.pop("model") == "PlainResNet20" and b.pop("model") == "resnet20"
  assert a == b
  for edges in ("sequential", "dataflow"):
    g1, g2 = (graph_lib.workload_graph(w, edges=edges) for w in (wl_user, wl_zoo))
    for x1, x2 in zip(g1, g2):
      assert np.array_equal(x1, x2)


# --------------------------------------------------------------------------- errors


def test_unhandled_quantizable_params_are_named():
  class RawDot(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), strides=4)(x).reshape(x.shape[0], -1)
      return x @ self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 10))

  class WithEinsum(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Einsum((1, 10), "nc,ck->nk", name="head")(jnp.mean(x, axis=(1, 2)))

  for module, param, kind in ((RawDot(), "params/w", "RawDot"),
                              (WithEinsum(), "params/head/kernel", "Einsum")):
    v = module.init(jax.random.key(0), _images(1))
    with pytest.raises(ValueError, match=f"'{param}'.*type {kind}.*nn.Dense"):
      models.check_intercepted(models.intercept(module), v, SHAPE)


def test_attention_layernorm_and_positional_params_pass_the_check(mixed):
  _, wrapped, variables, _ = mixed
  models.check_intercepted(wrapped, variables, SHAPE)   # raises on a false positive


# --------------------------------------------------------------------------- search


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    x = nn.relu(_bn(train, "bn")(nn.Conv(16, (3, 3), strides=2)(x)))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


SEARCH = {"eval_per_class": 2, "calib_per_class": 2, "calib_batches": 2,
          "selection_per_class": 2, "final_max_images": 20, "population": 8, "generations": 1,
          "species": [{"kind": "direct_round"}, {"kind": "gcn", "hidden": 8}],
          "edges": "dataflow", "min_species_size": 2, "archive_size": 32, "seed": 0}
DIRECT = [{"kind": "direct_round"}, {"kind": "direct_floor"}]   # no GNN to compile


def _fashion(split, per_class):
  images, labels = data_lib.load_split("fashion_mnist_embedded", split)
  idx = data_lib.stratified_subset(labels, per_class, seed=0)
  return data_lib.preprocess("fashion_mnist_embedded", images[idx]), labels[idx]


def test_search_with_a_user_model_and_in_memory_data():
  module = TinyCNN()
  variables = module.init(jax.random.key(0), _images(1))
  data = {"train": _fashion("train", 6), "test": _fashion("test", 2)}   # 2+2+2 train sets
  cfg = nemo_jax.load_search_config(dict(SEARCH, model="custom", dataset="arrays",
                                         input_shape=SHAPE, num_classes=10))
  problem = nemo_jax.build_problem(cfg, model=module, variables=variables, data=data,
                                   progress=False)
  assert problem.workload.layer_names == ("Conv_0", "Conv_1", "Dense_0")
  # The FP32 configuration through the evaluator is the plain float model.
  x_eval, y_eval, _ = fitness_data(cfg.problem, cfg.seed, cfg.selection_per_class,
                                   problem.data)
  ref = np.mean(np.argmax(np.asarray(module.apply(variables, x_eval)), -1) == y_eval)
  assert float(problem.evaluator.evaluate_float().top1) == pytest.approx(ref, abs=1e-7)
  result = nemo_jax.search(SEARCH, model=module, variables=variables, data=data,
                           progress=False, problem=problem)
  assert result.front and all("final_top1" in m for m in result.front)
  assert all(len(m["w_bits"]) == 3 for m in result.front)
  # A tuple is the train split; the final re-evaluation is skipped.
  result = nemo_jax.search(dict(SEARCH, species=DIRECT), model=module, variables=variables,
                           data=data["train"], progress=False, generations=0)
  assert result.config.model == "custom" and result.config.dataset == "arrays"
  assert result.config.final_split is None and result.config.num_classes == 10
  assert result.front and "final_top1" not in result.front[0]
  assert "selection_top1" in result.front[0]          # held-out train images
  with pytest.raises(ValueError, match="split 'val' is invalid"):
    nemo_jax.search(SEARCH, model=module, variables=variables, data={"val": data["test"]})
  with pytest.raises(ValueError, match="pass model= and variables="):
    nemo_jax.search(dict(SEARCH, model="custom"), data=data, progress=False)


FACTORY = '''
import jax, jax.numpy as jnp, flax.linen as nn

class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))

class RawHead(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.mean(nn.Conv(4, (3, 3), strides=2)(x), axis=(1, 2))
    return jnp.dot(x, self.param("head", nn.initializers.zeros, (4, 10)))

def make_model():
  return TinyCNN(), TinyCNN().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))

def make_bad():
  return RawHead(), RawHead().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
'''


def test_cli_factory_model(tmp_path, capsys):
  factory = tmp_path / "my_models.py"
  factory.write_text(textwrap.dedent(FACTORY))
  config = tmp_path / "config.json"
  config.write_text(json.dumps(dict(SEARCH, model=f"{factory}:make_model", species=DIRECT)))
  out = tmp_path / "run"
  assert cli.main(["search", "--config", str(config), "--out", str(out), "--quiet"]) == 0
  saved = json.loads((out / "config.json").read_text())["config"]
  assert saved["problem"]["model"] == f"{factory}:make_model"
  front = json.loads((out / "front.json").read_text())
  assert front and all(len(m["w_bits"]) == 2 for m in front)
  capsys.readouterr()
  assert cli.main(["layers", f"{factory}:make_model", "--input-shape", "28,28,1"]) == 0
  layers = json.loads(capsys.readouterr().out)
  assert layers["model"] == "TinyCNN" and [l["macs"] for l in layers["layers"]] == [
      9 * 4 * 14 * 14, 40]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(dict(SEARCH, model=f"{factory}:make_bad")))
  capsys.readouterr()
  assert cli.main(["search", "--config", str(bad), "--out", str(tmp_path / "bad"), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: model: parameter 'params/head'") and "type RawHead" in err
  config.write_text(json.dumps(dict(SEARCH, model="no_such_module:make")))
  assert cli.main(["search", "--config", str(config), "--quiet", "--out",
                   str(tmp_path / "y")]) == 2
  assert "cannot import 'no_such_module'" in capsys.readouterr().err
