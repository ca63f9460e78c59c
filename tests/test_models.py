"""Model zoo: shapes, quantized-layer counts, parameter counts, config-as-data behaviour."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemo_jax._src import models
from nemo_jax._src.layers import QContext
from nemo_jax._src.qconfig import QuantConfig, stack_configs
from nemo_jax._src.spec import QuantSpec

SPEC = QuantSpec(weight_quant="symmetric_per_channel")

# Hand-counted conv + dense layers (torchvision for the ImageNet models):
# mobilenet_v2: stem + 1 block x 2 + 16 blocks x 3 + last 1x1 + classifier;
# resnet18: stem + 8 blocks x 2 + 3 downsamples + fc; resnet50: stem + 16 x 3 + 4 + fc;
# resnext101: stem + 33 x 3 + 4 + fc; resnet20: stem + 9 x 2 + 2 + fc; vgg16: 13 + 1.
NUM_LAYERS = {"mobilenet_v2": 53, "mobilenet_v2_small": 53, "resnet18": 21, "resnet50": 54,
              "resnext101_32x8d": 105, "resnet20": 22, "vgg16_cifar": 14}

SMALL = (28, 28, 1)


def test_registry_lists_every_model():
  assert models.list_models() == sorted(NUM_LAYERS)
  assert models.DEFAULT_MODEL == "resnet20"
  assert models.DEFAULT_INPUT_SHAPE == (28, 28, 1)
  assert models.DEFAULT_NUM_CLASSES == 10


@pytest.mark.parametrize("name", sorted(NUM_LAYERS))
@pytest.mark.parametrize("input_shape,num_classes", [((28, 28, 1), 10), ((64, 48, 3), 7)])
def test_output_shapes(name, input_shape, num_classes):
  model = models.get_model(name, input_shape, num_classes)
  variables = models.abstract_variables(model, input_shape)
  x = jax.ShapeDtypeStruct((3, *input_shape), jnp.float32)
  out = jax.eval_shape(lambda v, im: model.apply(v, im), variables, x)
  assert out.shape == (3, num_classes) and out.dtype == jnp.float32
  out_train, _ = jax.eval_shape(
      lambda v, im: model.apply(v, im, train=True, mutable=["batch_stats"]), variables, x)
  assert out_train.shape == (3, num_classes)


@pytest.mark.parametrize("name", sorted(NUM_LAYERS))
def test_number_of_quantized_layers(name):
  model = models.get_model(name, SMALL, 10)
  variables = models.abstract_variables(model, SMALL)
  seen = []

  def run(v, x):
    config = QuantConfig(w_bits=jnp.full(NUM_LAYERS[name], 8),
                         a_bits=jnp.full(NUM_LAYERS[name], 8), keep=None)
    ctx = QContext.from_config(config, spec=SPEC, on_layer=seen.append)
    out = model.apply(v, x, ctx)
    assert ctx.num_layers == NUM_LAYERS[name]
    return out

  jax.eval_shape(run, variables, jax.ShapeDtypeStruct((1, *SMALL), jnp.float32))
  assert len(seen) == NUM_LAYERS[name]
  assert [info.index for info in seen] == list(range(NUM_LAYERS[name]))
  assert seen[-1].op == "dense" and all(info.op != "dense" for info in seen[:-1])
  assert [info.name for info in models.trace_layers(model, SMALL)] == [i.name for i in seen]


def test_layer_order_within_blocks():
  names = [i.name for i in models.trace_layers(models.get_model("resnet20", SMALL, 10), SMALL)]
  assert names[:3] == ["conv1", "layer1_0/conv1", "layer1_0/conv2"]
  # the option-B shortcut comes after the block's main path (torchvision order)
  assert names[7:10] == ["layer2_0/conv1", "layer2_0/conv2", "layer2_0/downsample_conv"]
  assert names[-1] == "fc"
  infos = models.trace_layers(models.get_model("mobilenet_v2", SMALL, 10), SMALL)
  assert sum(i.op == "depthwise" for i in infos) == 17
  assert infos[1].name == "features_1/dw_conv"  # t == 1: no expansion conv
  assert infos[3].name == "features_2/expand_conv"


def _resnet20_params(cin, classes):
  """ResNet-20 parameter count by hand (conv weights + BN scale/bias + fc)."""
  conv = lambda k, i, o: k * k * i * o + 2 * o  # noqa: E731  (conv + its BN)
  total = conv(3, cin, 16)
  for stage, (i, o) in enumerate([(16, 16), (16, 32), (32, 64)]):
    total += conv(3, i, o) + conv(3, o, o) + 2 * 2 * conv(3, o, o)  # 3 blocks x 2 convs
    if stage:
      total += conv(1, i, o)
  return total + 64 * classes + classes


def _vgg16_params(cin, classes):
  total, c = 0, cin
  for item in (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512):
    total += 9 * c * item + item + 2 * item  # conv weight + conv bias + BN
    c = item
  return total + 512 * classes + classes


def test_param_counts_of_cifar_models():
  for shape, classes in [((28, 28, 1), 10), ((32, 32, 3), 100)]:
    r20 = models.abstract_variables(models.get_model("resnet20", shape, classes), shape)
    assert models.count_params(r20) == _resnet20_params(shape[-1], classes)
    vgg = models.abstract_variables(models.get_model("vgg16_cifar", shape, classes), shape)
    assert models.count_params(vgg) == _vgg16_params(shape[-1], classes)
  assert _vgg16_params(3, 10) == 14_728_266  # EMOMC's VGG-16 (~14.7M)


def random_variables(model, input_shape, seed=0):
  """He-scaled random weights and non-trivial BN statistics, drawn with numpy.

  (Flax's own init compiles ~50 random-normal programs, which is slow on XLA:CPU;
  ``init_variables`` itself is tested once below.)
  """
  rng = np.random.default_rng(seed)
  shapes = models.abstract_variables(model, input_shape)

  def draw(path, spec):
    leaf = path[-1].key
    if leaf == "kernel":
      fan_in = int(np.prod(spec.shape[:-1]))
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), spec.shape)
    elif leaf in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, spec.shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.1, spec.shape)
    return jnp.asarray(value, spec.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_init_variables():
  model = models.get_model("resnet20", SMALL, 10)
  variables = models.init_variables(model, jax.random.key(0), SMALL)
  assert models.count_params(variables) == _resnet20_params(1, 10)
  assert float(jnp.std(variables["params"]["layer1_0"]["conv1"]["kernel"])) > 0
  np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], np.ones(16))


def test_vgg_classifier_input():
  """At 32x32 the last pool leaves 1x1x512: the global pool is EMOMC's flatten."""
  model = models.get_model("vgg16_cifar", (32, 32, 3), 10)
  variables = random_variables(model, (32, 32, 3))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  logits, state = jax.jit(lambda v, im: model.apply(
      v, im, capture_intermediates=True, mutable=["intermediates"]))(variables, x)
  last_bn = np.asarray(state["intermediates"]["bn12"]["__call__"][0])
  assert last_bn.shape == (2, 2, 2, 512)
  flat = np.maximum(last_bn, 0).max(axis=(1, 2))  # ReLU, 2x2 pool, flatten
  fc = variables["params"]["classifier"]
  np.testing.assert_allclose(logits, flat @ fc["kernel"] + fc["bias"], rtol=1e-4, atol=1e-4)
  # 28x28: 14, 7, 3, 1 and the fifth pool leaves 1x1 alone
  model28 = models.get_model("vgg16_cifar", SMALL, 10)
  _, state28 = jax.eval_shape(lambda v, im: model28.apply(
      v, im, capture_intermediates=True, mutable=["intermediates"]),
      models.abstract_variables(model28, SMALL), jax.ShapeDtypeStruct((1, *SMALL), jnp.float32))
  assert state28["intermediates"]["bn12"]["__call__"][0].shape == (1, 1, 1, 512)


def test_maxpool_pads_with_minus_infinity():
  from nemo_jax._src.models.resnet import max_pool_torch
  x = -jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)  # all negative: 0-padding would win
  out = max_pool_torch(x, 3, 2, 1)
  xp = np.pad(np.asarray(x)[0, :, :, 0], 1, constant_values=-np.inf)
  ref = np.array([[xp[r:r + 3, c:c + 3].max() for c in (0, 2)] for r in (0, 2)])
  np.testing.assert_array_equal(np.asarray(out)[0, :, :, 0], ref)


@pytest.fixture(scope="module")
def resnet20():
  model = models.get_model("resnet20", SMALL, 10)
  variables = random_variables(model, SMALL)
  x = jax.random.uniform(jax.random.key(1), (2, *SMALL))
  return model, variables, x


def _logits(model):
  def fn(config, variables, x):
    return model.apply(variables, x, QContext.from_config(config, spec=SPEC))
  return fn


def test_config_is_data_not_structure(resnet20, evaluators):
  _, variables, x = resnet20
  single, _, _, traces = evaluators
  out_a = single(QuantConfig.uniform(22, 8, 8, 1.0), variables, x)
  out_b = single(QuantConfig.uniform(22, 2, 3, 0.5), variables, x)
  out_c = single(QuantConfig.uniform(22, 32, 32, 1.0), variables, x)
  assert len(traces) == 1  # also counts the calls made by the other tests
  assert not np.allclose(out_a, out_b) and not np.allclose(out_a, out_c)


def _weight_population(num_layers):
  """Weight bits and keep only: no activation quantizer, so no rounding-boundary flips."""
  rng = np.random.default_rng(0)
  return [QuantConfig.uniform(num_layers, 32, 32, 1.0),
          QuantConfig(w_bits=jnp.asarray(rng.integers(2, 9, num_layers), jnp.int32),
                      a_bits=jnp.full(num_layers, 32, jnp.int32), keep=jnp.float32(0.5)),
          QuantConfig.uniform(num_layers, 3, 32, 1.0)]


def _full_population(num_layers):
  rng = np.random.default_rng(1)
  return [QuantConfig.uniform(num_layers, 32, 32, 1.0),
          QuantConfig(w_bits=jnp.asarray(rng.integers(4, 9, num_layers), jnp.int32),
                      a_bits=jnp.asarray(rng.integers(6, 9, num_layers), jnp.int32),
                      keep=jnp.float32(0.7)),
          QuantConfig.uniform(num_layers, 4, 8, 0.5)]


@pytest.fixture(scope="module")
def evaluators(resnet20):
  """Loop / vmap / lax.map evaluators, compiled once and shared by the tests."""
  model = resnet20[0]
  traces = []

  def counted(config, variables, x):
    traces.append(1)  # Python side effect: runs once per trace, not per call
    return _logits(model)(config, variables, x)

  single = jax.jit(counted)
  vmapped = jax.jit(jax.vmap(_logits(model), in_axes=(0, None, None)))
  mapped = jax.jit(lambda p, v, im: jax.lax.map(lambda c: _logits(model)(c, v, im), p))
  return single, vmapped, mapped, traces


def _population_three_ways(evaluators, variables, x, configs):
  single, vmapped, mapped, _ = evaluators
  population = stack_configs(configs)
  loop = np.stack([np.asarray(single(c, variables, x)) for c in configs])
  return (loop, np.asarray(vmapped(population, variables, x)),
          np.asarray(mapped(population, variables, x)))


def test_vmap_and_lax_map_equal_loop_weight_configs(resnet20, evaluators):
  _, variables, x = resnet20
  loop, vmapped, mapped = _population_three_ways(evaluators, variables, x,
                                                 _weight_population(22))
  assert loop.shape == (3, 2, 10)
  np.testing.assert_allclose(vmapped, loop, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(mapped, loop, rtol=1e-4, atol=1e-4)
  for i, j in [(0, 1), (0, 2), (1, 2)]:  # the configs really differ
    assert np.abs(loop[i] - loop[j]).max() > 0.1


def test_vmap_and_lax_map_equal_loop_with_activation_quantizers(resnet20, evaluators):
  """With activation quantizers, 1-ulp differences between the batched and per-member
  convolutions can flip a rounding boundary (a random network amplifies such a flip),
  so the comparison is relative to the spread between configs, not bitwise."""
  _, variables, x = resnet20
  loop, vmapped, mapped = _population_three_ways(evaluators, variables, x,
                                                 _full_population(22))
  tolerance = 0.02 * np.abs(loop).max()
  np.testing.assert_allclose(vmapped, loop, rtol=0, atol=tolerance)
  np.testing.assert_allclose(mapped, loop, rtol=0, atol=tolerance)
  for i, j in [(0, 1), (0, 2), (1, 2)]:
    assert np.abs(loop[i] - loop[j]).max() > 5 * tolerance


def test_w32a32_equals_float_exactly(resnet20, evaluators):
  """32 bits and keep 1 are the float model, bit for bit, layer by layer.

  Every layer's output is materialised (``capture_intermediates``) so that XLA cannot
  fuse across layers differently in the two programs; fused as a whole, the two jitted
  programs may differ by float reassociation (checked to 1e-5 relative below).
  (ResNet-20 only: compiling is the slow part on CPU; it has conv, dense and bias.)
  """
  model, variables, x = resnet20
  config = QuantConfig.uniform(22, 32, 32, 1.0)

  def run(config, v, im):
    ctx = None if config is None else QContext.from_config(config, spec=SPEC)
    return model.apply(v, im, ctx, capture_intermediates=True, mutable=["intermediates"])

  float_out, float_layers = jax.jit(lambda v, im: run(None, v, im))(variables, x)
  quant_out, quant_layers = jax.jit(run)(config, variables, x)
  np.testing.assert_array_equal(np.asarray(quant_out), np.asarray(float_out))
  jax.tree_util.tree_map(np.testing.assert_array_equal, quant_layers, float_layers)
  fused_float = jax.jit(lambda v, im: model.apply(v, im))(variables, x)
  fused_quant = evaluators[0](config, variables, x)  # already compiled
  np.testing.assert_allclose(fused_quant, fused_float, rtol=1e-5, atol=1e-5)


def test_train_mode_updates_batch_stats(resnet20):
  model, variables, x = resnet20
  out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert out.shape == (2, 10)
  # Independent reference for the stem BN: torch momentum 0.1 on the stem conv output.
  kernel = np.asarray(variables["params"]["conv1"]["kernel"], np.float64)
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = sum(xp[:, i:i + 28, j:j + 28, :] @ kernel[i, j] for i in range(3) for j in range(3))
  before = np.asarray(variables["batch_stats"]["bn1"]["mean"])
  expected = 0.9 * before + 0.1 * conv.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"], expected, rtol=1e-5,
                             atol=1e-6)


def test_injectable_layers():
  import flax.linen as nn
  model = models.get_model("resnet20", SMALL, 10, act=nn.gelu)
  assert model.act is nn.gelu


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r"model='resnet21' is invalid.*allowed.*resnet20"):
    models.get_model("resnet21")
  with pytest.raises(ValueError, match="input_shape"):
    models.get_model("resnet20", (28, 28))
  with pytest.raises(ValueError, match="input_shape"):
    models.get_model("resnet20", (28, 0, 1))
  with pytest.raises(ValueError, match="num_classes"):
    models.get_model("resnet20", SMALL, 0)
  with pytest.raises(ValueError, match="num_classes"):
    models.get_model("resnet20", SMALL, True)
  with pytest.raises(ValueError, match="width_mult"):
    models.get_model("mobilenet_v2", SMALL, 10, width_mult=-1.0)
  with pytest.raises(ValueError, match="bad option"):
    models.get_model("resnet20", SMALL, 10, no_such_option=3)


@pytest.mark.parametrize("shape, kernel, stride, pad", [
    ((2, 9, 7, 6), 3, 1, 1), ((2, 9, 7, 6), 3, 2, 1), ((1, 8, 8, 4), 5, 2, 2),
    ((3, 5, 6, 2), 3, (2, 1), (1, 0))])
def test_depthwise_shift_equals_the_grouped_convolution(shape, kernel, stride, pad):
  from nemo_jax._src import layers
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, shape[-1])).astype(np.float32))
  s = stride if isinstance(stride, tuple) else (stride, stride)
  p = pad if isinstance(pad, tuple) else (pad, pad)
  padding = ((p[0], p[0]), (p[1], p[1]))
  ref = jax.lax.conv_general_dilated(x, w, s, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=shape[-1])
  got = layers.depthwise_shift(x, w, s, padding)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # Through the model: a MobileNet-V2's logits agree under both implementations.
  model = models.get_model("mobilenet_v2_small", SMALL, 10)
  v = models.init_variables(model, jax.random.key(0), SMALL)
  xs = jnp.asarray(rng.normal(size=(2, *SMALL)).astype(np.float32))
  outs = {}
  for impl in ("conv", "shift"):
    with layers.depthwise_impl(impl):
      outs[impl] = np.asarray(model.apply(v, xs))
  np.testing.assert_allclose(outs["shift"], outs["conv"], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="impl='fast' is invalid"):
    with layers.depthwise_impl("fast"):
      pass
