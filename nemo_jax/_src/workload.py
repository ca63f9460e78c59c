"""The workload of a model: its quantizers, per-layer shapes/MACs/params and edges.

A :class:`Workload` is *extracted*, never hand-written: the model is traced once
(abstractly, no FLOPs are spent) with a recording :class:`~nemo_jax._src.layers.QContext`,
so any model built from ``QConv`` / ``QDense`` works without a table.

Quantizers and node order
  Quantized layer ``i`` (0-based, execution order) owns two quantizers: the quantizer
  of its input activation (config ``a_bits[i]``) and of its weights (``w_bits[i]``).
  Graph nodes are these ``2L`` quantizers, in execution order
  ``a_0, w_0, a_1, w_1, ...``: node ``2i`` is ``a_i``, node ``2i + 1`` is ``w_i``
  (:func:`nodes_to_config_index`, :func:`split_node_bits`).

Edges (node level, ``int32 [E, 2]`` rows ``(sender, receiver)``)
  * ``sequential_edges``: NEMO's chain ``a_0 -> w_0 -> a_1 -> w_1 -> ...``.
  * ``dataflow_edges``: ``a_i -> w_i`` inside every layer, and ``w_i -> a_j``
    whenever the output of layer ``i`` reaches the input of layer ``j`` through
    non-quantized ops only (BatchNorm, ReLU, residual add, pooling, concat, reshape).
    The layer-level pairs ``(i, j)`` are ``layer_edges``. Found by walking the
    model's jaxpr (see :func:`_dataflow_layer_edges`): every layer's input is tagged
    with a marker primitive during tracing; "nearest upstream quantized layers" sets
    are propagated through the jaxpr and reset at every marker. Note that through an
    identity shortcut the *same* tensor carries several layers' outputs (a ResNet
    block output is ``conv3 + previous block output``), so a layer can have several
    upstream layers even in a plain chain of residual blocks; this is the true
    data flow, not an approximation. Layers fed by the image have no incoming
    ``w -> a`` edge (the image is not a node).

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
from nemo_jax._src.layers import LayerInfo, QContext

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
    layer_edges: int32 ``[E, 2]`` data-flow pairs ``(i, j)`` of layers.
    sequential_edges: int32 ``[2L - 1, 2]`` node-level chain.
    dataflow_edges: int32 ``[E', 2]`` node-level data-flow edges.
  """
  model_name: str
  input_shape: tuple[int, int, int]
  num_classes: int | None
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
  layer_edges: np.ndarray
  sequential_edges: np.ndarray
  dataflow_edges: np.ndarray

  @property
  def num_layers(self) -> int:
    """Number of quantized (conv/dense) layers ``L``."""
    return len(self.layer_names)

  @property
  def num_quantizers(self) -> int:
    """Number of quantizers (graph nodes): ``2L``."""
    return 2 * self.num_layers

  @property
  def quantized_params(self) -> int:
    """Parameters (weights + biases) of the quantized layers."""
    return int(self.params.sum())

  @property
  def total_macs(self) -> int:
    """Conv + dense MACs per image."""
    return int(self.macs.sum())

  @property
  def node_kind(self) -> np.ndarray:
    """int32 ``[2L]``: :data:`KIND_ACTIVATION` (even nodes) / :data:`KIND_WEIGHT` (odd)."""
    return np.tile(np.array([KIND_ACTIVATION, KIND_WEIGHT], np.int32), self.num_layers)

  @property
  def node_layer(self) -> np.ndarray:
    """int32 ``[2L]``: the layer each quantizer node belongs to."""
    return np.repeat(np.arange(self.num_layers, dtype=np.int32), 2)

  def __repr__(self) -> str:
    return (f"Workload({self.model_name!r}, input_shape={self.input_shape}, "
            f"layers={self.num_layers}, params={self.total_params:,}, "
            f"macs={self.total_macs:,})")


# ----------------------------------------------------------------------------------
# Quantizer-node helpers.


def nodes_to_config_index(workload: Workload) -> list[tuple[str, int]]:
  """Maps each graph node to ``(kind, layer)``, kind ``"a"`` (a_bits) or ``"w"`` (w_bits).

  Args:
    workload: the workload.

  Returns:
    A list of length ``2L``: ``[("a", 0), ("w", 0), ("a", 1), ("w", 1), ...]``.
  """
  return [(k, i) for i in range(workload.num_layers) for k in ("a", "w")]


def split_node_bits(bits):
  """Splits per-node bit-widths ``[..., 2L]`` into ``(w_bits[..., L], a_bits[..., L])``.

  Jit/vmap-friendly (static slicing). Node ``2i`` is ``a_i``, node ``2i + 1`` is ``w_i``.

  Args:
    bits: array ``[..., 2L]`` in node order.

  Returns:
    ``(w_bits, a_bits)``, each ``[..., L]``.
  """
  if bits.shape[-1] % 2:
    raise ValueError(f"bits: last axis must be 2L (one per quantizer), got {bits.shape}")
  return bits[..., 1::2], bits[..., 0::2]


def merge_node_bits(w_bits, a_bits):
  """Inverse of :func:`split_node_bits`: ``[..., L] x 2 -> [..., 2L]`` in node order."""
  stacked = jnp.stack([jnp.asarray(a_bits), jnp.asarray(w_bits)], axis=-1)
  return stacked.reshape(stacked.shape[:-2] + (2 * stacked.shape[-2],))


# ----------------------------------------------------------------------------------
# Tracing.

# Identity primitive that tags "input of quantized layer i" in a jaxpr. It only ever
# exists inside `jax.make_jaxpr` during extraction (never lowered or executed).
_layer_input_p = jex_core.Primitive("nemo_layer_input")
_layer_input_p.def_impl(lambda x, *, layer: x)
_layer_input_p.def_abstract_eval(lambda x, *, layer: x)


def _tracing_context(infos: list) -> QContext:
  """A float context that records LayerInfos and tags every layer's input with a marker."""
  return QContext(on_layer=infos.append,
                  quantize_input=lambda x, i: _layer_input_p.bind(x, layer=i))


def _sub_jaxprs(eqn) -> list:
  return [p for p in jex_core.jaxprs_in_params(eqn.params)]


def _contains_marker(jaxpr) -> bool:
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive is _layer_input_p:
      return True
    if any(_contains_marker(sub) for sub in _sub_jaxprs(eqn)):
      return True
  return False


def _propagate(jaxpr, in_labels: list[frozenset], upstream: dict[int, frozenset]):
  """Propagates upstream-layer label sets through ``jaxpr``; returns outvar labels.

  A value's label is the set of quantized layers whose outputs reach it without
  passing through another quantized layer. Every marker records its input's label as
  ``upstream[layer]`` and emits ``{layer}``: the layer's own computation starts there.
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
    if eqn.primitive is _layer_input_p:
      layer = eqn.params["layer"]
      upstream[layer] = upstream.get(layer, empty) | ins[0]
      outs = [frozenset([layer])]
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


def _dataflow_layer_edges(closed_jaxpr, num_layers: int) -> np.ndarray:
  """Layer-level data-flow pairs ``(i, j)`` from a jaxpr with layer-input markers."""
  jaxpr = closed_jaxpr.jaxpr
  upstream: dict[int, frozenset] = {}
  _propagate(jaxpr, [frozenset()] * len(jaxpr.invars), upstream)
  edges = sorted((i, j) for j in range(num_layers) for i in upstream.get(j, ()))
  for i, j in edges:
    if not i < j:
      raise RuntimeError(f"data-flow edge {i}->{j} goes backwards in execution order")
  return np.asarray(edges, np.int32).reshape(-1, 2)


def _node_edges(num_layers: int, layer_edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Node-level sequential and data-flow edges (see module docstring)."""
  n = 2 * num_layers
  seq = np.stack([np.arange(n - 1), np.arange(1, n)], axis=1).astype(np.int32)
  inner = np.stack([2 * np.arange(num_layers), 2 * np.arange(num_layers) + 1], axis=1)
  cross = np.stack([2 * layer_edges[:, 0] + 1, 2 * layer_edges[:, 1]], axis=1)
  flow = np.concatenate([inner, cross]).astype(np.int32).reshape(-1, 2)
  order = np.lexsort((flow[:, 1], flow[:, 0]))
  return seq.reshape(-1, 2), flow[order]


def _count_params(variables) -> int:
  tree = variables.get("params", {}) if isinstance(variables, Mapping) else variables
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def _resolve_model(model_or_name, input_shape, num_classes, model_kwargs):
  """Returns ``(module, name, input_shape, num_classes)``."""
  if isinstance(model_or_name, str):
    name = model_or_name
    kwargs = dict(model_kwargs)
    default_shape, default_classes = zoo.default_spec(name)
    input_shape = tuple(input_shape) if input_shape is not None else default_shape
    num_classes = num_classes if num_classes is not None else default_classes
    if input_shape is not None:
      kwargs["input_shape"] = input_shape
    if num_classes is not None:
      kwargs["num_classes"] = num_classes
    module = zoo.get_model(name, **kwargs)
  else:
    module = model_or_name
    name = type(module).__name__
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


def _extract(module, name, input_shape, num_classes) -> Workload:
  recorded: list[LayerInfo] = []
  ctx = _tracing_context(recorded)

  def init(x):
    return module.init(jax.random.key(0), x, ctx, train=False)

  x = jax.ShapeDtypeStruct((1,) + input_shape, jnp.float32)
  closed_jaxpr, var_shapes = jax.make_jaxpr(init, return_shape=True)(x)
  infos = sorted(recorded, key=lambda info: info.index)
  if not infos:
    raise ValueError(f"model {name!r}: no QConv/QDense layer was called with the context")
  if [info.index for info in infos] != list(range(len(infos))):
    raise RuntimeError(f"model {name!r}: layer indices are not 0..L-1: "
                       f"{[info.index for info in infos]}")
  num_layers = len(infos)
  layer_edges = _dataflow_layer_edges(closed_jaxpr, num_layers)
  seq, flow = _node_edges(num_layers, layer_edges)

  def col(fn, dtype=np.int64):
    return np.asarray([fn(info) for info in infos], dtype)

  in_h, in_w = col(lambda s: s.in_hw[0]), col(lambda s: s.in_hw[1])
  out_h, out_w = col(lambda s: s.out_hw[0]), col(lambda s: s.out_hw[1])
  cin, cout = col(lambda s: s.in_channels), col(lambda s: s.out_channels)
  arrays = dict(
      op_codes=col(lambda s: OP_TYPES.index(s.op), np.int32),
      in_channels=cin, out_channels=cout, groups=col(lambda s: s.groups),
      kernel_h=col(lambda s: s.kernel_size[0]), kernel_w=col(lambda s: s.kernel_size[1]),
      stride_h=col(lambda s: s.stride[0]), stride_w=col(lambda s: s.stride[1]),
      in_h=in_h, in_w=in_w, out_h=out_h, out_w=out_w,
      weights=col(lambda s: s.weights), params=col(lambda s: s.params),
      macs=col(lambda s: s.macs),
      in_act_elems=in_h * in_w * cin, out_act_elems=out_h * out_w * cout)
  for arr in arrays.values():
    arr.setflags(write=False)
  for arr in (layer_edges, seq, flow):
    arr.setflags(write=False)
  return Workload(
      model_name=name, input_shape=input_shape, num_classes=num_classes,
      layer_names=tuple(info.name for info in infos),
      ops=tuple(info.op for info in infos),
      total_params=_count_params(var_shapes),
      layer_edges=layer_edges, sequential_edges=seq, dataflow_edges=flow, **arrays)


@functools.lru_cache(maxsize=64)
def _extract_by_name(name, input_shape, num_classes, kwargs_items) -> Workload:
  module, name, input_shape, num_classes = _resolve_model(
      name, input_shape, num_classes, dict(kwargs_items))
  return _extract(module, name, input_shape, num_classes)


def extract_workload(model_or_name, input_shape=None, num_classes=None,
                     **model_kwargs) -> Workload:
  """Traces a model once (abstractly) and returns its :class:`Workload`.

  Args:
    model_or_name: a zoo name (``get_model``) or a Flax module whose
      ``__call__(x, ctx=None, train=False)`` routes every conv/dense through
      ``QConv`` / ``QDense``.
    input_shape: ``(H, W, C)``; default: the zoo's default for the name.
    num_classes: classes of the classifier; default: the zoo's default.
    **model_kwargs: extra ``get_model`` keyword arguments (names only).

  Returns:
    The workload. For names the result is cached (same object for equal arguments).

  Raises:
    ValueError: unknown model name, bad input shape, or no quantized layer.
  """
  if isinstance(model_or_name, str):
    shape = None if input_shape is None else tuple(int(s) for s in input_shape)
    try:
      items = tuple(sorted(model_kwargs.items()))
      hash(items)
    except TypeError:
      module, name, shape, classes = _resolve_model(model_or_name, shape, num_classes,
                                                    model_kwargs)
      return _extract(module, name, shape, classes)
    return _extract_by_name(model_or_name, shape, num_classes, items)
  if model_kwargs:
    raise ValueError(f"model_kwargs: only allowed with a model name, got "
                     f"{sorted(model_kwargs)} for a module instance")
  module, name, shape, classes = _resolve_model(model_or_name, input_shape, num_classes, {})
  return _extract(module, name, shape, classes)


# ----------------------------------------------------------------------------------
# JSON.


def layer_dicts(workload: Workload) -> list[dict]:
  """One plain-python dict per quantized layer (execution order)."""
  out = []
  for i in range(workload.num_layers):
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
        "quantizers": {"a": 2 * i, "w": 2 * i + 1},
    })
  return out


def workload_to_json(workload: Workload) -> dict:
  """The workload as a JSON-serialisable dict (``nemo-jax layers``).

  Args:
    workload: the workload.

  Returns:
    ``{"model", "input_shape", "num_classes", "num_layers", "num_quantizers",
    "total_params", "quantized_params", "total_macs", "node_order", "layers",
    "layer_edges", "sequential_edges", "dataflow_edges"}`` with plain python values.
  """
  return {
      "model": workload.model_name,
      "input_shape": list(workload.input_shape),
      "num_classes": workload.num_classes,
      "num_layers": workload.num_layers,
      "num_quantizers": workload.num_quantizers,
      "total_params": int(workload.total_params),
      "quantized_params": workload.quantized_params,
      "total_macs": workload.total_macs,
      "node_order": "a_0, w_0, a_1, w_1, ... (node 2i = input activation of layer i, "
                    "node 2i+1 = weights of layer i)",
      "layers": layer_dicts(workload),
      "layer_edges": workload.layer_edges.tolist(),
      "sequential_edges": workload.sequential_edges.tolist(),
      "dataflow_edges": workload.dataflow_edges.tolist(),
  }
