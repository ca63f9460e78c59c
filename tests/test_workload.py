"""Workload extraction and the jraph graph, checked against torchvision and hand counts."""

from __future__ import annotations

import json

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemo_jax._src import workload as wlmod
from nemo_jax._src.graph import FEATURE_NAMES, node_features, workload_graph
from nemo_jax._src.layers import QConv, QDense
from nemo_jax._src.workload import extract_workload, nodes_to_config_index, workload_to_json

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
import torch.fx  # noqa: E402

IMAGENET = {  # torchvision parameter counts; conv+dense MACs at 224x224 (NEMO paper, torchvision)
    "mobilenet_v2": (3_504_872, 0.30e9),
    "resnet18": (11_689_512, 1.82e9),
    "resnet50": (25_557_032, 4.09e9),
    "resnext101_32x8d": (88_791_336, 16.4e9),
}


class TinyResidual(nn.Module):
  """conv(s2) -> BN/ReLU -> conv -> ReLU -> depthwise, + skip, -> 1x1 conv -> GAP -> dense."""

  @nn.compact
  def __call__(self, x, ctx=None, train=False):
    x = QConv(8, 3, strides=2)(x, ctx)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    y = nn.relu(QConv(8, 3)(x, ctx))
    y = QConv(8, 3, feature_group_count=8)(y, ctx)
    x = x + y
    z = QConv(16, 1)(x, ctx)
    return QDense(10)(jnp.mean(z, axis=(1, 2)), ctx)


def test_tiny_model_hand_counts():
  wl = extract_workload(TinyResidual(), (8, 8, 3), 10)
  assert wl.num_layers == 5 and wl.num_quantizers == 10
  assert wl.ops == ("conv", "conv", "depthwise", "conv", "dense")
  # 8x8 input, stride 2, pad 1 -> 4x4.
  np.testing.assert_array_equal(wl.out_h, [4, 4, 4, 4, 1])
  np.testing.assert_array_equal(wl.in_h, [8, 4, 4, 4, 1])
  np.testing.assert_array_equal(wl.weights, [3 * 3 * 3 * 8, 3 * 3 * 8 * 8, 3 * 3 * 1 * 8,
                                             8 * 16, 16 * 10])
  np.testing.assert_array_equal(wl.params, wl.weights + [0, 0, 0, 0, 10])
  np.testing.assert_array_equal(wl.macs, [216 * 16, 576 * 16, 72 * 16, 128 * 16, 160])
  np.testing.assert_array_equal(wl.in_act_elems, [8 * 8 * 3, 4 * 4 * 8, 4 * 4 * 8,
                                                  4 * 4 * 8, 16])
  np.testing.assert_array_equal(wl.groups, [1, 1, 8, 1, 1])
  assert wl.total_params == int(wl.params.sum()) + 16  # + BN scale and bias
  # Data flow: the skip sends layer 0's output to layer 3.
  assert wl.layer_edges.tolist() == [[0, 1], [0, 3], [1, 2], [2, 3], [3, 4]]
  assert wl.sequential_edges.tolist() == [[i, i + 1] for i in range(9)]
  inner = [[2 * i, 2 * i + 1] for i in range(5)]
  cross = [[1, 2], [1, 6], [3, 4], [5, 6], [7, 8]]
  assert sorted(wl.dataflow_edges.tolist()) == sorted(inner + cross)
  assert nodes_to_config_index(wl)[:4] == [("a", 0), ("w", 0), ("a", 1), ("w", 1)]


def _torch_layers(name):
  """(in_ch, out_ch, groups, kernel, stride, in_hw, out_hw, weights) per conv/linear, in
  execution order, plus the parameter count, from torchvision on the meta device."""
  records = []

  def hook(mod, inputs, output):
    x = inputs[0]
    if isinstance(mod, torch.nn.Conv2d):
      records.append((mod.in_channels, mod.out_channels, mod.groups, tuple(mod.kernel_size),
                      tuple(mod.stride), tuple(x.shape[2:]), tuple(output.shape[2:]),
                      mod.weight.numel()))
    else:
      records.append((mod.in_features, mod.out_features, 1, (1, 1), (1, 1), (1, 1), (1, 1),
                      mod.weight.numel()))

  with torch.device("meta"):
    model = getattr(torchvision.models, name)()
    for mod in model.modules():
      if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
        mod.register_forward_hook(hook)
    model(torch.zeros(1, 3, 224, 224))
  return records, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(IMAGENET))
def test_imagenet_counts_match_torchvision(name):
  wl = extract_workload(name, (224, 224, 3), 1000)
  params, macs = IMAGENET[name]
  records, torch_params = _torch_layers(name)
  assert wl.total_params == params == torch_params
  assert abs(wl.total_macs - macs) / macs < 0.01
  ours = [(int(wl.in_channels[i]), int(wl.out_channels[i]), int(wl.groups[i]),
           (int(wl.kernel_h[i]), int(wl.kernel_w[i])), (int(wl.stride_h[i]),
                                                          int(wl.stride_w[i])),
           (int(wl.in_h[i]), int(wl.in_w[i])), (int(wl.out_h[i]), int(wl.out_w[i])),
           int(wl.weights[i])) for i in range(wl.num_layers)]
  assert ours == records
  # Independent MAC count from the torch shapes.
  torch_macs = [w * oh * ow for (*_, (oh, ow), w) in records]
  np.testing.assert_array_equal(wl.macs, torch_macs)
  # Conv/dense params + BN/other params add up to the model total.
  assert wl.quantized_params <= wl.total_params


def _fx_dataflow(name):
  """Layer data-flow pairs from torch.fx: nearest upstream conv/linear of each one."""
  model = getattr(torchvision.models, name)()
  graph = torch.fx.symbolic_trace(model).graph
  modules = dict(model.named_modules())
  labels, edges, index = {}, set(), 0
  for node in graph.nodes:
    ups = set().union(*[labels.get(n, set()) for n in node.all_input_nodes])
    if node.op == "call_module" and isinstance(modules[node.target],
                                               (torch.nn.Conv2d, torch.nn.Linear)):
      edges |= {(i, index) for i in ups}
      labels[node] = {index}
      index += 1
    else:
      labels[node] = ups
  return sorted(edges)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_dataflow_edges_match_torch_fx(name):
  wl = extract_workload(name, (224, 224, 3), 1000)
  assert wl.layer_edges.tolist() == [list(e) for e in _fx_dataflow(name)]


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "mobilenet_v2"])
@pytest.mark.parametrize("edges", ["sequential", "dataflow"])
def test_graph_valid_and_deterministic(name, edges):
  wl = extract_workload(name)
  g = workload_graph(wl, edges=edges)
  n = wl.num_quantizers
  assert g.nodes.shape == (n, len(FEATURE_NAMES)) and g.nodes.dtype == np.float32
  assert int(g.n_node[0]) == n and int(g.n_edge[0]) == len(g.senders)
  assert np.all(np.isfinite(g.nodes))
  assert np.all((g.senders >= 0) & (g.senders < n) & (g.receivers >= 0) & (g.receivers < n))
  assert np.all(g.senders < g.receivers)  # execution order: edges point forward
  # one-hot type is one-hot, weight flag matches odd nodes
  assert np.all(g.nodes[:, :6].sum(axis=1) == 1)
  np.testing.assert_array_equal(g.nodes[:, FEATURE_NAMES.index("needs_weight_quant")],
                                np.arange(n) % 2)
  if edges == "dataflow":  # every layer's a -> w edge, and every layer reachable
    pairs = set(zip(g.senders.tolist(), g.receivers.tolist()))
    assert all((2 * i, 2 * i + 1) in pairs for i in range(wl.num_layers))
    assert set(g.receivers.tolist()) >= set(range(1, n)) - {0}
  # A fresh trace (bypassing the cache) gives identical arrays.
  again = wlmod._extract_by_name.__wrapped__(name, None, None, "conv_inputs", (), None)
  assert again is not wl
  g2 = workload_graph(again, edges=edges)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_array_equal(a, b)


def test_graph_padding_and_bidirectional():
  wl = extract_workload("resnet20")
  g = workload_graph(wl, "dataflow", bidirectional=True)
  e = len(wl.dataflow_edges)
  assert len(g.senders) == 2 * e
  padded = workload_graph(wl, "dataflow", pad_nodes=64, pad_edges=200)
  assert padded.nodes.shape[0] == 64 and padded.senders.shape[0] == 200
  assert padded.n_node.tolist() == [wl.num_quantizers, 64 - wl.num_quantizers]
  assert padded.edges[:e].sum() == e and padded.edges[e:].sum() == 0
  np.testing.assert_array_equal(padded.nodes[:wl.num_quantizers], node_features(wl))
  with pytest.raises(ValueError, match="pad_nodes"):
    workload_graph(wl, pad_nodes=wl.num_quantizers)
  with pytest.raises(ValueError, match="edges"):
    workload_graph(wl, edges="skip")


def test_features_model_independent():
  """The same layer shape gets the same features in different models (fixed caps)."""
  small = node_features(extract_workload("resnet18"))
  big = node_features(extract_workload("resnet50"))
  # the 7x7 stem conv is identical in both models (position differs: drop it)
  np.testing.assert_array_equal(small[:2, :-1], big[:2, :-1])
  assert small.max() <= 1.0 + 1e-6 and big.min() >= 0.0


@hypothesis.settings(deadline=None, max_examples=20)
@hypothesis.given(st.sampled_from(["resnet20", "mobilenet_v2", "vgg16_cifar"]),
                  st.sampled_from(["conv_inputs", "nncf"]), st.integers(1, 3),
                  st.integers(0, 2**31 - 1))
def test_split_merge_node_bits(name, placement, batch, seed):
  wl = extract_workload(name, placement=placement)
  rng = np.random.default_rng(seed)
  w = rng.integers(2, 9, (batch, wl.num_layers))
  a = rng.integers(2, 9, (batch, wl.num_act_quantizers))
  nodes = wl.merge_node_bits(w, a)
  assert nodes.shape == (batch, wl.num_quantizers)
  if placement == "conv_inputs":
    np.testing.assert_array_equal(nodes[:, 0::2], a)  # node 2i = a_i
  for n, (kind, i) in enumerate(nodes_to_config_index(wl)):
    np.testing.assert_array_equal(nodes[:, n], (w if kind == "w" else a)[:, i])
  w2, a2 = jax.jit(wl.split_node_bits)(nodes)
  np.testing.assert_array_equal(w2, w)
  np.testing.assert_array_equal(a2, a)


def test_workload_json_and_cache():
  wl = extract_workload("resnet20")
  assert extract_workload("resnet20") is wl
  d = json.loads(json.dumps(workload_to_json(wl)))
  assert d["num_layers"] == 22 and d["num_quantizers"] == 44
  assert d["total_params"] == wl.total_params
  assert sum(layer["macs"] for layer in d["layers"]) == d["total_macs"]
  assert d["layers"][0]["quantizers"] == {"a": 0, "w": 1}
  assert d["placement"] == "conv_inputs" and d["node_order"][:3] == ["a_0", "w_0", "a_1"]
  n = json.loads(json.dumps(workload_to_json(extract_workload("resnet20", placement="nncf"))))
  assert n["num_act_quantizers"] == 31 and n["num_quantizers"] == 53
  assert n["activation_quantizers"][3]["kind"] == "residual"


def test_bad_input():
  with pytest.raises(ValueError, match="model"):
    extract_workload("resnet9000")
  with pytest.raises(ValueError, match="input_shape"):
    extract_workload("resnet20", input_shape=(28, 28))
  with pytest.raises(ValueError, match="model_kwargs"):
    extract_workload(TinyResidual(), (8, 8, 3), foo=1)
  with pytest.raises(ValueError, match="last axis"):
    extract_workload("resnet20").split_node_bits(jnp.zeros((3,)))
  with pytest.raises(ValueError, match="placement"):
    extract_workload("resnet20", placement="everywhere")


# --------------------------------------------------------------------------- placement


def _fx_nncf_placement(name):
  """NNCF-style activation quantizers from torch.fx, independently of the Flax ports.

  One quantizer per tensor (fx node) read by a Conv2d / Linear, by a residual add or by
  a max-pool, shared by all its readers, created in execution order. Returns a list of
  ``(kind, layers reading it)``: kind "input" when a layer reads it first, else
  "residual" / "pool".
  """
  import operator
  model = getattr(torchvision.models, name)()
  graph = torch.fx.symbolic_trace(model).graph
  modules = dict(model.named_modules())
  quantizers, index_of, layer = [], {}, 0

  def quantize(node, kind, reader=None):
    if node not in index_of:
      index_of[node] = len(quantizers)
      quantizers.append([kind, []])
    if reader is not None:
      quantizers[index_of[node]][1].append(reader)

  for node in graph.nodes:
    if node.op == "call_module":
      mod = modules[node.target]
      if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
        quantize(node.args[0], "input", layer)
        layer += 1
      elif isinstance(mod, torch.nn.MaxPool2d):
        quantize(node.args[0], "pool")
    elif node.op == "call_function" and node.target in (operator.add, operator.iadd,
                                                        torch.add):
      for arg in node.args[:2]:
        quantize(arg, "residual")
  return [(k, tuple(r)) for k, r in quantizers]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_nncf_placement_equals_torch_fx(name):
  wl = extract_workload(name, (224, 224, 3), 1000, placement="nncf")
  ours = [(kind, consumers) for kind, consumers in zip(wl.act_kinds, wl.layer_consumers)]
  assert ours == _fx_nncf_placement(name)
  # Shared quantizers: every layer reads exactly one, and the BOPs gather follows it.
  assert sorted(i for c in wl.layer_consumers for i in c) == list(range(wl.num_layers))
  for i, q in enumerate(wl.input_quantizer.tolist()):
    assert i in wl.layer_consumers[q]


def test_nncf_quantizer_counts_hand_and_paper():
  # ResNet-18 by hand: 21 weight quantizers; activations: image, max-pool input, per
  # BasicBlock its input (shared by conv1 / downsample / identity) and conv2 input
  # (8 x 2), the fc input, and the residual inputs that are new tensors: 8 bn2
  # outputs + 3 downsample outputs: 1 + 1 + 16 + 1 + 11 = 30.
  r18 = extract_workload("resnet18", placement="nncf")
  assert (r18.num_layers, r18.num_act_quantizers) == (21, 30)
  assert r18.act_kinds.count("residual") == 11 and r18.act_kinds.count("pool") == 1
  shared = [c for c in r18.layer_consumers if len(c) > 1]
  assert len(shared) == 3  # the three block inputs read by conv1 and downsample_conv
  # NEMO's search spaces (paper, NNCF): 116 / 125 / 244 quantizers.
  for name, total in (("mobilenet_v2", 116), ("resnet50", 125), ("resnext101_32x8d", 244)):
    assert extract_workload(name, placement="nncf").num_quantizers == total, name
  # conv_inputs: one per layer input, 106 / 108 / 210.
  for name, total in (("mobilenet_v2", 106), ("resnet50", 108), ("resnext101_32x8d", 210)):
    assert extract_workload(name).num_quantizers == total, name
