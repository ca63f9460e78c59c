"""torchvision -> Flax conversion: logits agree with torchvision, strict key checking.

The reference is torchvision itself (models built with ``weights=None``; nothing is
downloaded). BatchNorm running statistics are calibrated on random images and the BN
affine parameters randomised, so BN conversion is really exercised.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemo_jax._src import checkpoint, convert, models

# torchvision's own parameter counts (torchvision.models.*_Weights meta "num_params").
TORCHVISION_PARAMS = {"mobilenet_v2": 3_504_872, "resnet18": 11_689_512,
                      "resnet50": 25_557_032, "resnext101_32x8d": 88_791_336}


@pytest.fixture(scope="module")
def torch_libs():
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.set_num_threads(2)
  return torch, torchvision


def _randomized_torch_model(torch, torchvision, name, seed, **kwargs):
  """A torchvision model in eval mode with non-trivial BN statistics and affines."""
  torch.manual_seed(seed)
  net = getattr(torchvision.models, name)(weights=None, **kwargs)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for bn in bns:
    bn.reset_running_stats()
    bn.momentum = None  # cumulative average over the calibration batches
  net.train()
  with torch.no_grad():
    net(torch.randn(4, 3, 64, 64))  # calibration: realistic, non-default running stats
    for bn in bns:
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.normal_(0.0, 0.2)
  net.eval()
  return net


def _nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _classifier(torch, net):
  return [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]


@pytest.mark.parametrize("name,batch", [("mobilenet_v2", 2), ("resnet18", 2),
                                        ("resnet50", 2), ("resnext101_32x8d", 1)])
def test_float_logits_match_torchvision(torch_libs, name, batch):
  torch, torchvision = torch_libs
  net = _randomized_torch_model(torch, torchvision, name, seed=1)
  x = torch.randn(batch, 3, 224, 224)
  with torch.no_grad():
    # Scale the classifier so logits are O(1): the 1e-4 absolute tolerance then means
    # ~1e-5 relative (deep random ResNets otherwise give logits in the thousands).
    fc = _classifier(torch, net)
    scale = float(net(x).std())
    fc.weight /= scale
    fc.bias /= scale
    expected = net(x).numpy()
  state = net.state_dict()
  bn_var = next(v for k, v in state.items() if k.endswith("running_var"))
  assert not np.allclose(bn_var.numpy(), 1.0)  # BN statistics are really non-trivial
  variables = convert.torchvision_to_flax(state, name)
  model = models.get_model(name)
  logits = jax.jit(lambda v, im: model.apply(v, im))(variables, _nhwc(x))
  assert logits.shape == expected.shape
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-4)


def test_mobilenet_width_and_classes_convert(torch_libs):
  torch, torchvision = torch_libs
  net = _randomized_torch_model(torch, torchvision, "mobilenet_v2", seed=2,
                                width_mult=0.5, num_classes=7)
  x = torch.randn(2, 3, 96, 80)
  with torch.no_grad():
    expected = net(x).numpy()
  variables = convert.torchvision_to_flax(net.state_dict(), "mobilenet_v2", (96, 80, 3),
                                          7, width_mult=0.5)
  model = models.get_model("mobilenet_v2", (96, 80, 3), 7, width_mult=0.5)
  logits = jax.jit(lambda v, im: model.apply(v, im))(variables, _nhwc(x))
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50"])
def test_layer_order_is_torch_execution_order(torch_libs, name):
  """Quantizer index i is the i-th conv/linear torchvision executes (forward hooks)."""
  torch, torchvision = torch_libs
  net = getattr(torchvision.models, name)(weights=None)
  called = []
  for module_name, module in net.named_modules():
    if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
      module.register_forward_hook(lambda m, i, o, n=module_name: called.append(n))
  with torch.no_grad():
    net.eval()(torch.zeros(1, 3, 32, 32))
  model = models.get_model(name)
  params = models.abstract_variables(model, (32, 32, 3))["params"]
  infos = models.trace_layers(model, (32, 32, 3))
  assert [convert.torch_module_name(name, info.name, params) for info in infos] == called


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_param_counts_equal_torchvision(name):
  model = models.get_model(name)
  shapes = models.abstract_variables(model, (224, 224, 3))  # no allocation
  assert models.count_params(shapes) == TORCHVISION_PARAMS[name]


def test_param_counts_match_torchvision_metadata(torch_libs):
  _, torchvision = torch_libs
  weights = {"mobilenet_v2": torchvision.models.MobileNet_V2_Weights,
             "resnet18": torchvision.models.ResNet18_Weights,
             "resnet50": torchvision.models.ResNet50_Weights,
             "resnext101_32x8d": torchvision.models.ResNeXt101_32X8D_Weights}
  for name, enum in weights.items():
    assert enum.IMAGENET1K_V1.meta["num_params"] == TORCHVISION_PARAMS[name]


@pytest.fixture(scope="module")
def resnet18_state(torch_libs):
  torch, torchvision = torch_libs
  torch.manual_seed(3)
  net = torchvision.models.resnet18(weights=None, num_classes=10)
  return {k: v.numpy().copy() for k, v in net.state_dict().items()}


def test_strict_names_missing_key(resnet18_state):
  state = dict(resnet18_state)
  del state["layer2.0.downsample.1.running_var"]
  with pytest.raises(ValueError, match=r"missing keys.*layer2\.0\.downsample\.1\.running_var"):
    convert.torchvision_to_flax(state, "resnet18", num_classes=10)


def test_strict_names_every_problem_at_once(resnet18_state):
  state = dict(resnet18_state)
  del state["layer1.1.bn2.weight"]
  state["layer3.0.conv1.weight"] = np.zeros((256, 64, 3, 3), np.float32)  # wrong I
  state["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as err:
    convert.torchvision_to_flax(state, "resnet18", num_classes=10)
  message = str(err.value)
  assert "layer1.1.bn2.weight" in message
  assert "layer3.0.conv1.weight: checkpoint shape (256, 64, 3, 3)" in message
  assert "(256, 128, 3, 3)" in message
  assert "extra.weight" in message


def test_strict_names_class_count_mismatch(resnet18_state):
  with pytest.raises(ValueError, match=r"fc\.weight: checkpoint shape \(10, 512\)"):
    convert.torchvision_to_flax(resnet18_state, "resnet18", num_classes=1000)


def test_unknown_model_is_refused(resnet18_state):
  with pytest.raises(ValueError, match="resnet20.*allowed.*mobilenet_v2"):
    convert.torchvision_to_flax(resnet18_state, "resnet20")


def test_checkpoint_round_trip(torch_libs, resnet18_state, tmp_path):
  torch, _ = torch_libs
  pth = tmp_path / "r18.pth"
  # Wrapped and DataParallel-prefixed, as training scripts often save them.
  torch.save({"state_dict": {f"module.{k}": torch.from_numpy(v)
                             for k, v in resnet18_state.items()}, "epoch": 3}, pth)
  out = tmp_path / "r18.msgpack"
  variables = convert.convert_checkpoint(pth, "resnet18", out, input_shape=(32, 32, 3))
  model = models.get_model("resnet18", (32, 32, 3), 10)  # num_classes read from fc
  loaded = checkpoint.load_variables(out, model, (32, 32, 3))
  flat_a = jax.tree_util.tree_leaves_with_path(variables)
  flat_b = jax.tree_util.tree_leaves_with_path(loaded)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (_, a), (_, b) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(
      np.asarray(loaded["params"]["layer1_0"]["conv1"]["kernel"]),
      resnet18_state["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))


def test_load_variables_validates_structure(resnet18_state, tmp_path):
  variables = convert.torchvision_to_flax(resnet18_state, "resnet18", (32, 32, 3), 10)
  path = tmp_path / "v.msgpack"
  checkpoint.save_variables(path, variables)
  other = models.get_model("resnet18", (32, 32, 3), 5)
  with pytest.raises(ValueError, match=r"params/fc/kernel: file \(512, 10\), model \(512, 5\)"):
    checkpoint.load_variables(path, other, (32, 32, 3))
  variables["params"]["extra"] = {"kernel": jnp.zeros(2)}
  del variables["batch_stats"]["bn1"]
  checkpoint.save_variables(path, variables)
  model = models.get_model("resnet18", (32, 32, 3), 10)
  with pytest.raises(ValueError, match=r"missing: \['batch_stats/bn1/mean'.*unexpected: "
                                       r"\['params/extra/kernel'\]"):
    checkpoint.load_variables(path, model, (32, 32, 3))
  del variables["params"]["extra"]
  variables["params"]["extra"] = {"kernel": jnp.zeros(2)}
  variables["batch_stats"]["bn1"] = {"mean": jnp.zeros(64), "var": jnp.ones(64)}
  checkpoint.save_variables(path, variables)
  loaded = checkpoint.load_variables(path, model, (32, 32, 3), strict=False)
  assert "extra" not in loaded["params"]


def test_load_torch_checkpoint_rejects_non_state_dict(torch_libs, tmp_path):
  torch, _ = torch_libs
  path = tmp_path / "bad.pth"
  torch.save([1, 2, 3], path)
  with pytest.raises(ValueError, match="expected a state dict"):
    convert.load_torch_checkpoint(path)
  with pytest.raises(ValueError, match="no such file"):
    convert.load_torch_checkpoint(tmp_path / "absent.pth")


def test_missing_torch_gives_clear_error(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(ImportError, match="pip install"):
    convert.load_torch_checkpoint(tmp_path / "x.pth")
