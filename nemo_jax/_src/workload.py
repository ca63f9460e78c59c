"""The workload of a model: its quantizers, per-layer shapes/MACs/params and edges.

A :class:`Workload` is *extracted*, never hand-written: the model is traced once
(abstractly, no FLOPs are spent) with a recording :class:`~nemo_jax._src.layers.QContext`,
so any model built from ``QConv`` / ``QDense`` works without a table.

Quantizers and node order
  Quantized layer ``i`` (0-based, execution order) has a weight quantizer
  (``w_bits[i]``); activation quantizers (``a_bits[q]``) sit where the context's
  ``placement`` puts them (``spec.PLACEMENTS``): with ``"conv_inputs"`` quantizer
  ``q = i`` is layer ``i``'s input; with ``"nncf"`` one quantizer per tensor is shared
  by the layers that read it and residual adds / max-pools have their own.
  ``input_quantizer[i]`` is the activation quantizer layer ``i`` reads (what its BOPs
  count). Graph nodes are all quantizers in the order the trace creates them; for
  ``"conv_inputs"`` that is ``a_0, w_0, a_1, w_1, ...`` (node ``2i`` is ``a_i``, node
  ``2i + 1`` is ``w_i``). ``node_kind`` / ``node_index`` map nodes to config entries
  (:meth:`Workload.split_node_bits`, :func:`nodes_to_config_index`).

Edges (node level, ``int32 [E, 2]`` rows ``(sender, receiver)``)
  * ``sequential_edges``: NEMO's chain over the nodes in execution order.
  * ``dataflow_edges``: ``a -> w_i`` for the activation quantizer layer ``i`` reads,
    ``w_i -> a`` whenever the output of layer ``i`` reaches activation quantizer ``a``
    through non-quantized ops only (BatchNorm, ReLU, residual add, pooling, concat,
    reshape), and ``a -> a'`` when a quantized activation reaches another activation
    quantizer the same way (e.g. a residual-add input feeding the next block's input).
    The layer-level pairs ``(i, j)`` (output of layer ``i`` reaches layer ``j``'s input,
    activation quantizers being transparent) are ``layer_edges``. Found by walking the
    model's jaxpr (see :func:`_dataflow_edges`): every node tags its value with a
    marker primitive during tracing (activation quantizers their input, weight nodes
    their layer's output); "nearest upstream node" sets are propagated through the
    jaxpr and reset at every marker. Note that through an identity shortcut the *same*
    tensor carries several layers' outputs (a ResNet block output is ``conv3 +
    previous block output``), so a node can have several upstream nodes even in a
    plain chain of residual blocks; this is the true data flow, not an approximation.
    Quantizers fed by the image have no incoming edge (the image is not a node).

Counting conventions (per image, batch 1)
  ``macs[i]`` = ``k_h * k_w * (C_in / groups) * C_out * H_out * W_out`` for convs and
  ``C_in * C_out`` for dense layers; ``weights[i]`` = kernel elements (what is
  quantized and pruned); ``params[i]`` = weights + bias; ``total_params`` = every
  learnable parameter in the ``params`` collection of the variables tree (including
  BatchNorm scale/bias and biases; BatchNorm running statistics excluded), which is
  what torchvision's ``sum(p.numel() for p in model.parameters())`` counts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from nemo_jax._src import models as zoo
from nemo_jax._src.layers import ActInfo, LayerInfo, QContext
from nemo_jax._src.spec import PLACEMENTS

OP_TYPES = ("conv", "depthwise", "dense")
"""Op type codes (``Workload.op_codes``): index into this tuple."""

KIND_ACTIVATION = 0
KIND_WEIGHT = 1
NODE_KINDS = ("activation", "weight")
"""Quantizer kinds (``Workload.node_kind``): index into this tuple."""

@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
  """Static description of a model's quantized layers (host numpy, never traced).

  Identity-hashed (``eq=False``) so it can key caches of compiled cost functions;
  extracting the same zoo name twice returns the same object (lru_cache).

  Attributes:
    model_name: zoo name (or class name for a module instance).
    input_shape: ``(H, W, C)`` the model was traced with.
    num_classes: number of output classes (None if unknown).
    placement: where activation quantizers sit (``spec.PLACEMENTS``).
    layer_names: module path of each quantized layer, execution order.
    ops: op type per layer (``"conv"``, ``"depthwise"``, ``"dense"``).
    op_codes: int32 ``[L]`` index into :data:`OP_TYPES`.
    in_channels, out_channels, groups: int64 ``[L]``.
    kernel_h, kernel_w, stride_h, stride_w: int64 ``[L]`` (1 for dense).
    in_h, in_w, out_h, out_w: int64 ``[L]`` feature-map sizes (1 for dense).
    weights: int64 ``[L]`` kernel elements (quantized / pruned).
    params: int64 ``[L]`` weights + bias.
    macs: int64 ``[L]`` multiply-accumulates per image.
    in_act_elems, out_act_elems: int64 ``[L]`` input / output activation elements per
      image.
    total_params: every learnable parameter of the model (incl. BN and biases).
    input_quantizer: int32 ``[L]`` the activation quantizer layer ``i`` reads.
    act_kinds, act_names: per activation quantizer ``[La]``: ``layers.SITE_KINDS`` and
      a readable name.
    act_elems: int64 ``[La]`` elements of each activation quantizer's tensor, per image.
    act_channels: int64 ``[La]`` its channels (last axis).
    node_kind: int32 ``[N]`` :data:`KIND_ACTIVATION` / :data:`KIND_WEIGHT` per node.
    node_index: int32 ``[N]`` the node's index into ``a_bits`` / ``w_bits``.
    layer_edges: int32 ``[E, 2]`` data-flow pairs ``(i, j)`` of layers.
    sequential_edges: int32 ``[N - 1, 2]`` node-level chain.
    dataflow_edges: int32 ``[E', 2]`` node-level data-flow edges.
  """
  model_name: str
  input_shape: tuple[int, int, int]
  num_classes: int | None
  placement: str
  layer_names: tuple[str, ...]
  ops: tuple[str, ...]
  op_codes: np.ndarray
  in_channels: np.ndarray
  out_channels: np.ndarray
  groups: np.ndarray
  kernel_h: np.ndarray
  kernel_w: np.ndarray
  stride_h: np.ndarray
  stride_w: np.ndarray
  in_h: np.ndarray
  in_w: np.ndarray
  out_h: np.ndarray
  out_w: np.ndarray
  weights: np.ndarray
  params: np.ndarray
  macs: np.ndarray
  in_act_elems: np.ndarray
  out_act_elems: np.ndarray
  total_params: int
  input_quantizer: np.ndarray
  act_kinds: tuple[str, ...]
  act_names: tuple[str, ...]
  act_elems: np.ndarray
  act_channels: np.ndarray
  node_kind: np.ndarray
  node_index: np.ndarray
  layer_edges: np.ndarray
  sequential_edges: np.ndarray
  dataflow_edges: np.ndarray

  @property
  def num_layers(self) -> int:
    """Number of quantized (conv/dense) layers ``L`` (= weight quantizers)."""
    return len(self.layer_names)

  @property
  def num_act_quantizers(self) -> int:
    """Number of activation quantizers ``La`` (``len(a_bits)``)."""
    return len(self.act_kinds)

  @property
  def num_quantizers(self) -> int:
    """Number of quantizers (graph nodes): ``L + La``."""
    return self.num_layers + self.num_act_quantizers

  @property
  def weight_nodes(self) -> np.ndarray:
    """Node index of ``w_bits[i]``, ``[L]``."""
    return _positions(self.node_kind, self.node_index, KIND_WEIGHT, self.num_layers)

  @property
  def act_nodes(self) -> np.ndarray:
    """Node index of ``a_bits[q]``, ``[La]``."""
    return _positions(self.node_kind, self.node_index, KIND_ACTIVATION,
                      self.num_act_quantizers)

  def split_node_bits(self, bits):
    """Per-node bit-widths ``[..., N]`` -> ``(w_bits[..., L], a_bits[..., La])`` (jit-able)."""
    if bits.shape[-1] != self.num_quantizers:
      raise ValueError(f"bits: last axis must be {self.num_quantizers} (one per quantizer), "
                       f"got {bits.shape}")
    if self.placement == "conv_inputs":
      return bits[..., 1::2], bits[..., 0::2]   # static slices: a_0, w_0, a_1, w_1, ...
    return bits[..., self.weight_nodes], bits[..., self.act_nodes]

  def merge_node_bits(self, w_bits, a_bits):
    """Inverse of :meth:`split_node_bits`: ``([..., L], [..., La]) -> [..., N]``."""
    w_bits, a_bits = jnp.asarray(w_bits), jnp.asarray(a_bits)
    out = jnp.zeros(w_bits.shape[:-1] + (self.num_quantizers,), w_bits.dtype)
    return out.at[..., self.weight_nodes].set(w_bits).at[..., self.act_nodes].set(a_bits)

  @property
  def layer_consumers(self) -> tuple[tuple[int, ...], ...]:
    """The layers reading each activation quantizer ``[La]`` (empty for add/pool sites)."""
    out = [[] for _ in range(self.num_act_quantizers)]
    for i, q in enumerate(self.input_quantizer.tolist()):
      out[q].append(i)
    return tuple(tuple(c) for c in out)

  @property
  def quantized_params(self) -> int:
    """Parameters (weights + biases) of the quantized layers."""
    return int(self.params.sum())

  @property
  def total_macs(self) -> int:
    """Conv + dense MACs per image."""
    return int(self.macs.sum())

  def __repr__(self) -> str:
    return (f"Workload({self.model_name!r}, input_shape={self.input_shape}, "
            f"layers={self.num_layers}, activation quantizers={self.num_act_quantizers} "
            f"({self.placement}), params={self.total_params:,}, macs={self.total_macs:,})")


def _positions(kind, index, which, count) -> np.ndarray:
  out = np.zeros(count, np.int32)
  sel = kind == which
  out[index[sel]] = np.nonzero(sel)[0]
  return out


# ----------------------------------------------------------------------------------
# Quantizer-node helpers.


def nodes_to_config_index(workload: Workload) -> list[tuple[str, int]]:
  """Maps each graph node to ``(kind, index)``, kind ``"a"`` (a_bits) or ``"w"`` (w_bits).

  Returns:
    A list of length ``N``; for ``"conv_inputs"``: ``[("a", 0), ("w", 0), ("a", 1), ...]``.
  """
  return [("w" if k == KIND_WEIGHT else "a", int(i))
          for k, i in zip(workload.node_kind.tolist(), workload.node_index.tolist())]


# ----------------------------------------------------------------------------------
# Tracing.

# Identity primitive that tags "the value of graph node n" in a jaxpr (an activation
# quantizer's input, or a layer's output for its weight node). It only ever exists
# inside `jax.make_jaxpr` during extraction (never lowered or executed).
_node_p = jex_core.Primitive("nemo_quantizer_node")
_node_p.def_impl(lambda x, *, node: x)
_node_p.def_abstract_eval(lambda x, *, node: x)


class _Trace:
  """Records layers, activation quantizers and the node order while tracing."""

  def __init__(self, placement: str):
    self.layers: list[LayerInfo] = []
    self.acts: list[ActInfo] = []
    self.nodes: list[tuple[int, int]] = []       # (kind, index) in creation order
    self.placement = placement

  def context(self) -> QContext:
    def on_input(x, q):
      self.nodes.append((KIND_ACTIVATION, q))
      return _node_p.bind(x, node=len(self.nodes) - 1)

    def on_output(y, i):
      self.nodes.append((KIND_WEIGHT, i))
      return _node_p.bind(y, node=len(self.nodes) - 1)

    return QContext(on_layer=self.layers.append, on_activation=self.acts.append,
                    on_output=on_output, quantize_input=on_input, placement=self.placement)


def _sub_jaxprs(eqn) -> list:
  return [p for p in jex_core.jaxprs_in_params(eqn.params)]


def _contains_marker(jaxpr) -> bool:
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive is _node_p:
      return True
    if any(_contains_marker(sub) for sub in _sub_jaxprs(eqn)):
      return True
  return False


def _propagate(jaxpr, in_labels: list[frozenset], upstream: dict[int, frozenset]):
  """Propagates upstream-node label sets through ``jaxpr``; returns outvar labels.

  A value's label is the set of graph nodes whose values reach it without passing
  through another node. Every marker records its input's label as ``upstream[node]``
  and emits ``{node}``.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  empty = frozenset()
  env: dict[Any, frozenset] = {}

  def read(v):
    if isinstance(v, jex_core.Literal):
      return empty
    return env.get(v, empty)

  for v, lab in zip(jaxpr.invars, in_labels):
    env[v] = lab
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    if eqn.primitive is _node_p:
      node = eqn.params["node"]
      upstream[node] = upstream.get(node, empty) | ins[0]
      outs = [frozenset([node])]
    else:
      subs = _sub_jaxprs(eqn)
      one_to_one = [s for s in subs
                    if len(getattr(s, "jaxpr", s).invars) == len(eqn.invars)
                    and len(getattr(s, "jaxpr", s).outvars) == len(eqn.outvars)]
      if subs and any(_contains_marker(s) for s in subs):
        if len(subs) != 1 or not one_to_one:
          raise NotImplementedError(
              f"quantized layers inside a {eqn.primitive} (scan/cond/while) are not "
              "supported by data-flow extraction")
        outs = _propagate(one_to_one[0], ins, upstream)
      else:
        # Opaque op (or call without markers): every output may depend on every input.
        union = frozenset().union(*ins) if ins else empty
        outs = [union] * len(eqn.outvars)
    for v, lab in zip(eqn.outvars, outs):
      env[v] = lab
  return [read(v) for v in jaxpr.outvars]


def _dataflow_edges(closed_jaxpr, nodes: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
  """Node-level data-flow edges and layer-level pairs from a jaxpr with node markers."""
  jaxpr = closed_jaxpr.jaxpr
  upstream: dict[int, frozenset] = {}
  _propagate(jaxpr, [frozenset()] * len(jaxpr.invars), upstream)
  edges = sorted((u, n) for n in range(len(nodes)) for u in upstream.get(n, ()))
  for u, n in edges:
    if not u < n:
      raise RuntimeError(f"data-flow edge {u}->{n} goes backwards in execution order")
  flow = np.asarray(edges, np.int32).reshape(-1, 2)
  # Layer i reaches layer j when w_i reaches the activation node w_j reads, through
  # activation nodes only (they do not compute).
  reach: dict[int, set[int]] = {}
  for n, (kind, _) in enumerate(nodes):
    if kind == KIND_ACTIVATION:
      reach[n] = set()
      for u in upstream.get(n, ()):
        reach[n] |= reach[u] if nodes[u][0] == KIND_ACTIVATION else {nodes[u][1]}
  layer_pairs = set()
  for n, (kind, index) in enumerate(nodes):
    if kind == KIND_WEIGHT:
      for u in upstream.get(n, ()):
        layer_pairs |= {(i, index) for i in reach.get(u, ())}
  layer_edges = np.asarray(sorted(layer_pairs), np.int32).reshape(-1, 2)
  return flow, layer_edges


def _count_params(variables) -> int:
  tree = variables.get("params", {}) if isinstance(variables, Mapping) else variables
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def _resolve_model(model_or_name, input_shape, num_classes, model_kwargs, registry=None):
  """Returns ``(module, name, input_shape, num_classes)``."""
  if isinstance(model_or_name, str):
    name = model_or_name
    kwargs = dict(model_kwargs)
    default_shape, default_classes = zoo.default_spec(name, registry)
    input_shape = tuple(input_shape) if input_shape is not None else default_shape
    num_classes = num_classes if num_classes is not None else default_classes
    if input_shape is not None:
      kwargs["input_shape"] = input_shape
    if num_classes is not None:
      kwargs["num_classes"] = num_classes
    module = zoo.get_model(name, registry=registry, **kwargs)
  else:
    module = model_or_name
    name = getattr(module, "model_name", None) or type(module).__name__
  if input_shape is None:
    input_shape = getattr(module, "input_shape", None)
  if num_classes is None:
    num_classes = getattr(module, "num_classes", None)
  if input_shape is None:
    raise ValueError(f"input_shape: required for model {name!r} (expected (H, W, C))")
  input_shape = tuple(int(s) for s in input_shape)
  if len(input_shape) != 3 or min(input_shape) < 1:
    raise ValueError(f"input_shape: expected (H, W, C) positive integers, got {input_shape}")
  return module, name, input_shape, num_classes


def _extract(module, name, input_shape, num_classes, placement) -> Workload:
  trace = _Trace(placement)
  ctx = trace.context()

  def init(x):
    return module.init(jax.random.key(0), x, ctx, train=False)

  x = jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32)
  closed_jaxpr, var_shapes = jax.make_jaxpr(init, return_shape=True)(x)
  infos = sorted(trace.layers, key=lambda info: info.index)
  if not infos:
    raise ValueError(f"model {name!r}: no QConv/QDense layer was called with the context")
  if [info.index for info in infos] != list(range(len(infos))):
    raise RuntimeError(f"model {name!r}: layer indices are not 0..L-1: "
                       f"{[info.index for info in infos]}")
  nodes = trace.nodes
  flow, layer_edges = _dataflow_edges(closed_jaxpr, nodes)
  n = len(nodes)
  seq = np.stack([np.arange(n - 1), np.arange(1, n)], axis=1).astype(np.int32).reshape(-1, 2)

  def col(fn, dtype=np.int64):
    return np.asarray([fn(info) for info in infos], dtype)

  in_h, in_w = col(lambda s: s.in_hw[0]), col(lambda s: s.in_hw[1])
  out_h, out_w = col(lambda s: s.out_hw[0]), col(lambda s: s.out_hw[1])
  cin, cout = col(lambda s: s.in_channels), col(lambda s: s.out_channels)
  acts = sorted(trace.acts, key=lambda a: a.index)
  arrays = dict(
      op_codes=col(lambda s: OP_TYPES.index(s.op), np.int32),
      in_channels=cin, out_channels=cout, groups=col(lambda s: s.groups),
      kernel_h=col(lambda s: s.kernel_size[0]), kernel_w=col(lambda s: s.kernel_size[1]),
      stride_h=col(lambda s: s.stride[0]), stride_w=col(lambda s: s.stride[1]),
      in_h=in_h, in_w=in_w, out_h=out_h, out_w=out_w,
      weights=col(lambda s: s.weights), params=col(lambda s: s.params),
      macs=col(lambda s: s.macs),
      in_act_elems=in_h * in_w * cin, out_act_elems=out_h * out_w * cout,
      input_quantizer=col(lambda s: s.input_quantizer, np.int32),
      act_elems=np.asarray([a.elems for a in acts], np.int64),
      act_channels=np.asarray([a.shape[-1] if a.shape else 1 for a in acts], np.int64),
      node_kind=np.asarray([k for k, _ in nodes], np.int32),
      node_index=np.asarray([i for _, i in nodes], np.int32))
  for arr in list(arrays.values()) + [layer_edges, seq, flow]:
    arr.setflags(write=False)
  return Workload(
      model_name=name, input_shape=input_shape, num_classes=num_classes, placement=placement,
      layer_names=tuple(info.name for info in infos),
      ops=tuple(info.op for info in infos),
      total_params=_count_params(var_shapes),
      act_kinds=tuple(a.kind for a in acts), act_names=tuple(a.name for a in acts),
      layer_edges=layer_edges, sequential_edges=seq, dataflow_edges=flow, **arrays)


@functools.lru_cache(maxsize=64)
def _extract_by_name(name, input_shape, num_classes, placement, kwargs_items,
                     registry) -> Workload:
  module, name, input_shape, num_classes = _resolve_model(
      name, input_shape, num_classes, dict(kwargs_items), registry)
  return _extract(module, name, input_shape, num_classes, placement)


def extract_workload(model_or_name, input_shape=None, num_classes=None,
                     placement: str = "conv_inputs", registry=None,
                     **model_kwargs) -> Workload:
  """Traces a model once (abstractly) and returns its :class:`Workload`.

  Args:
    model_or_name: a zoo name (``get_model``) or a Flax module whose
      ``__call__(x, ctx=None, train=False)`` routes every conv/dense through
      ``QConv`` / ``QDense``, or a plain linen model wrapped by ``intercept.intercept``
      (its ``nn.Conv`` / ``nn.Dense`` / ... calls are traced the same way).
    input_shape: ``(H, W, C)``; default: the zoo's default for the name.
    num_classes: classes of the classifier; default: the zoo's default.
    placement: where activation quantizers sit (``spec.PLACEMENTS``).
    registry: the ``models.ModelRegistry`` a name is looked up in (default: the zoo).
    **model_kwargs: extra ``get_model`` keyword arguments (names only).

  Returns:
    The workload. For names the result is cached (same object for equal arguments).

  Raises:
    ValueError: unknown model name, bad input shape, or no quantized layer.
  """
  if placement not in PLACEMENTS:
    raise ValueError(f"placement={placement!r} is invalid; allowed: {PLACEMENTS}")
  if isinstance(model_or_name, str):
    shape = None if input_shape is None else tuple(int(s) for s in input_shape)
    try:
      items = tuple(sorted(model_kwargs.items()))
      hash(items)
    except TypeError:
      module, name, shape, classes = _resolve_model(model_or_name, shape, num_classes,
                                                    model_kwargs, registry)
      return _extract(module, name, shape, classes, placement)
    return _extract_by_name(model_or_name, shape, num_classes, placement, items, registry)
  if model_kwargs:
    raise ValueError(f"model_kwargs: only allowed with a model name, got "
                     f"{sorted(model_kwargs)} for a module instance")
  module, name, shape, classes = _resolve_model(model_or_name, input_shape, num_classes, {})
  return _extract(module, name, shape, classes, placement)


# ----------------------------------------------------------------------------------
# JSON.


def layer_dicts(workload: Workload) -> list[dict]:
  """One plain-python dict per quantized layer (execution order).

  ``"quantizers"`` gives the graph nodes of the layer's input-activation and weight
  quantizers, ``"a_bits_index"`` the entry of ``a_bits`` the layer reads.
  """
  out = []
  w_nodes, a_nodes = workload.weight_nodes, workload.act_nodes
  for i in range(workload.num_layers):
    q = int(workload.input_quantizer[i])
    out.append({
        "index": i,
        "name": workload.layer_names[i],
        "op": workload.ops[i],
        "in_channels": int(workload.in_channels[i]),
        "out_channels": int(workload.out_channels[i]),
        "groups": int(workload.groups[i]),
        "kernel_size": [int(workload.kernel_h[i]), int(workload.kernel_w[i])],
        "stride": [int(workload.stride_h[i]), int(workload.stride_w[i])],
        "in_hw": [int(workload.in_h[i]), int(workload.in_w[i])],
        "out_hw": [int(workload.out_h[i]), int(workload.out_w[i])],
        "params": int(workload.params[i]),
        "weights": int(workload.weights[i]),
        "macs": int(workload.macs[i]),
        "in_act_elems": int(workload.in_act_elems[i]),
        "out_act_elems": int(workload.out_act_elems[i]),
        "quantizers": {"a": int(a_nodes[q]), "w": int(w_nodes[i])},
        "a_bits_index": q,
    })
  return out


def activation_dicts(workload: Workload) -> list[dict]:
  """One plain-python dict per activation quantizer (``a_bits`` order)."""
  consumers = workload.layer_consumers
  a_nodes = workload.act_nodes
  return [{"index": q, "name": workload.act_names[q], "kind": workload.act_kinds[q],
           "elems": int(workload.act_elems[q]), "node": int(a_nodes[q]),
           "read_by_layers": list(consumers[q])} for q in range(workload.num_act_quantizers)]


def workload_to_json(workload: Workload) -> dict:
  """The workload as a JSON-serialisable dict (``nemo-jax layers``).

  Args:
    workload: the workload.

  Returns:
    ``{"model", "input_shape", "num_classes", "placement", "num_layers",
    "num_act_quantizers", "num_quantizers", "total_params", "quantized_params",
    "total_macs", "node_order", "layers", "activation_quantizers", "layer_edges",
    "sequential_edges", "dataflow_edges"}`` with plain python values.
  """
  return {
      "model": workload.model_name,
      "input_shape": list(workload.input_shape),
      "num_classes": workload.num_classes,
      "placement": workload.placement,
      "num_layers": workload.num_layers,
      "num_act_quantizers": workload.num_act_quantizers,
      "num_quantizers": workload.num_quantizers,
      "total_params": int(workload.total_params),
      "quantized_params": workload.quantized_params,
      "total_macs": workload.total_macs,
      "node_order": [f"{k}_{i}" for k, i in nodes_to_config_index(workload)],
      "layers": layer_dicts(workload),
      "activation_quantizers": activation_dicts(workload),
      "layer_edges": workload.layer_edges.tolist(),
      "sequential_edges": workload.sequential_edges.tolist(),
      "dataflow_edges": workload.dataflow_edges.tolist(),
  }
