"""The workload as a ``jraph.GraphsTuple``: one node per quantizer, NEMO's node features.

Nodes are the quantizers in execution order (``a_0, w_0, a_1, w_1, ...`` for the
``conv_inputs`` placement; see :mod:`nemo_jax._src.workload`). A GNN emits one bit-width
per node; ``Workload.split_node_bits`` turns ``[..., N]`` into ``(w_bits, a_bits)``.

Node features (float32, :data:`FEATURE_NAMES`), model-independent so one GNN serves
every model:

* one-hot node type over ``{conv, depthwise, dense} x {activation, weight}`` (6);
* the patent's general features, each ``log2(1 + x) / log2(1 + cap)`` with a FIXED cap
  (not the model's max, so the same layer gets the same features in every model;
  values above a cap exceed 1 slightly instead of being clipped):
  in channels, out channels (cap 8192), input feature-map size ``H_in * W_in``
  (cap 1024^2), fully-connected input features (dense layers' ``C_in``, 0 for convs;
  cap 2^17), kernel size ``k_h * k_w`` (cap 128), learnable parameters of the layer
  (cap 2^28), stride (cap 8), depthwise flag, needs-weight-quantization flag
  (1 for weight nodes);
* two additions (not in the patent): the elements of the quantized tensor (weights for a
  weight node, input activation elements for an activation node; cap 2^28) and the
  relative position in execution order ``i / max(L - 1, 1)``.

An activation quantizer read by several layers takes the features of the first one.
Under the ``nncf`` placement, quantizers that no layer reads (residual-add inputs,
max-pool inputs) get two more one-hot columns (:data:`SITE_FEATURE_NAMES`, present only
in graphs that have such nodes): their channel / feature-map features are those of
their tensor, the layer features (kernel, parameters, stride) are 0 and the position is
that of the last layer before them.

Edges carry a single feature 1.0, so padded edges (feature 0) double as a mask.
"""

from __future__ import annotations

from typing import Sequence

import jraph
import numpy as np

from nemo_jax._src.workload import KIND_ACTIVATION, KIND_WEIGHT, OP_TYPES, Workload

__all__ = ["ALL_FEATURE_NAMES", "EDGE_TYPES", "FEATURE_NAMES", "SITE_FEATURE_NAMES",
           "feature_names", "node_features", "workload_graph"]

EDGE_TYPES = ("sequential", "dataflow")

_CAPS = {
    "in_channels": 8192.0, "out_channels": 8192.0, "in_fmap": 1024.0 ** 2,
    "fc_in_features": 2.0 ** 17, "kernel_size": 128.0, "params": 2.0 ** 28,
    "stride": 8.0, "tensor_elems": 2.0 ** 28,
}

FEATURE_NAMES = tuple(
    [f"type:{op}_{kind}" for op in OP_TYPES for kind in ("activation", "weight")]
    + ["in_channels", "out_channels", "in_fmap", "fc_in_features", "kernel_size",
       "params", "stride", "depthwise", "needs_weight_quant", "tensor_elems", "position"])
"""Column names of the node feature matrix."""

SITE_FEATURE_NAMES = ("type:residual_activation", "type:pool_activation")
"""Extra one-hot columns of graphs with residual / max-pool quantizers (``nncf``)."""

ALL_FEATURE_NAMES = FEATURE_NAMES + SITE_FEATURE_NAMES


def feature_names(workload: Workload) -> tuple[str, ...]:
  """The columns :func:`node_features` gives for ``workload``."""
  sites = any(k != "input" for k in workload.act_kinds)
  return ALL_FEATURE_NAMES if sites else FEATURE_NAMES


def _log_scale(x, cap: float) -> np.ndarray:
  return (np.log2(1.0 + np.asarray(x, np.float64)) / np.log2(1.0 + cap))


def node_features(workload: Workload) -> np.ndarray:
  """Node feature matrix ``float32 [N, F]`` (columns :func:`feature_names`).

  Args:
    workload: the workload.

  Returns:
    Finite features, identical for identical workloads.
  """
  wl = workload
  num_nodes = wl.num_quantizers
  kind, index = wl.node_kind, wl.node_index
  is_act = kind == KIND_ACTIVATION
  consumers = wl.layer_consumers
  # The layer each node describes: its own (weights), its first reader (activations),
  # or -1 for residual / pool quantizers; `last` is the last layer before the node.
  layer = np.where(is_act, [consumers[q][0] if consumers[q] else -1
                            for q in np.where(is_act, index, 0)], index)
  last = np.maximum(np.maximum.accumulate(np.where(is_act, -1, index)), 0)
  site = layer < 0
  lay = np.where(site, 0, layer)
  is_weight = (kind == KIND_WEIGHT).astype(np.float64)
  onehot = np.zeros((num_nodes, 2 * len(OP_TYPES)))
  rows = np.nonzero(~site)[0]
  onehot[rows, 2 * wl.op_codes[lay[rows]] + kind[rows]] = 1.0
  is_dense = np.asarray(wl.ops)[lay] == "dense"
  q = np.where(is_act, index, 0)
  tensor = np.where(is_act, wl.act_elems[q] if wl.num_act_quantizers else 0,
                    wl.weights[lay])
  channels = np.where(site, wl.act_channels[q] if wl.num_act_quantizers else 0, 0)
  fmap = np.where(site, wl.act_elems[q] // np.maximum(channels, 1)
                  if wl.num_act_quantizers else 0, 0)
  zero = lambda v: np.where(site, 0, v)
  general = np.stack([
      _log_scale(np.where(site, channels, wl.in_channels[lay]), _CAPS["in_channels"]),
      _log_scale(np.where(site, channels, wl.out_channels[lay]), _CAPS["out_channels"]),
      _log_scale(np.where(site, fmap, wl.in_h[lay] * wl.in_w[lay]), _CAPS["in_fmap"]),
      _log_scale(zero(np.where(is_dense, wl.in_channels[lay], 0)), _CAPS["fc_in_features"]),
      _log_scale(zero(wl.kernel_h[lay] * wl.kernel_w[lay]), _CAPS["kernel_size"]),
      _log_scale(zero(wl.params[lay]), _CAPS["params"]),
      _log_scale(zero(np.maximum(wl.stride_h, wl.stride_w)[lay]), _CAPS["stride"]),
      zero((np.asarray(wl.ops)[lay] == "depthwise").astype(np.float64)),
      is_weight,
      _log_scale(tensor, _CAPS["tensor_elems"]),
      np.where(site, last, layer) / max(wl.num_layers - 1, 1),
  ], axis=1)
  columns = [onehot, general]
  if feature_names(wl) is ALL_FEATURE_NAMES:
    act_kind = np.asarray([wl.act_kinds[i] if a else "" for i, a in zip(q, is_act)])
    columns.append(np.stack([site & (act_kind == "residual"), site & (act_kind == "pool")],
                            axis=1).astype(np.float64))
  return np.concatenate(columns, axis=1).astype(np.float32)


def workload_graph(workload: Workload, edges: str = "sequential",
                   pad_nodes: int | None = None, pad_edges: int | None = None,
                   bidirectional: bool = False) -> jraph.GraphsTuple:
  """The workload as a single-graph ``jraph.GraphsTuple`` (host numpy leaves).

  Args:
    workload: the workload.
    edges: ``"sequential"`` (NEMO: ``a_0 -> w_0 -> a_1 -> ...``) or ``"dataflow"``
      (true data flow incl. skip connections, see the workload module).
    pad_nodes: if given, pad to this many nodes (must exceed ``2L``: jraph's padding
      graph needs at least one node); the result then has 2 graphs, the real one first.
    pad_edges: edges after padding (default: the real count); only with ``pad_nodes``.
    bidirectional: also add every edge reversed (for message passing both ways).

  Returns:
    ``GraphsTuple`` with ``nodes float32 [N, F]``, ``edges float32 [E, 1]`` (1 real,
    0 padding), ``senders``/``receivers int32 [E]``, ``n_node``/``n_edge int32 [G]``,
    ``globals float32 [G, 1]`` (zeros).

  Raises:
    ValueError: unknown ``edges`` or a padding size that is too small.
  """
  if edges not in EDGE_TYPES:
    raise ValueError(f"edges: unknown edge type {edges!r}; allowed: {list(EDGE_TYPES)}")
  pairs = workload.sequential_edges if edges == "sequential" else workload.dataflow_edges
  pairs = np.asarray(pairs, np.int32).reshape(-1, 2)
  if bidirectional:
    pairs = np.concatenate([pairs, pairs[:, ::-1]])
  nodes = node_features(workload)
  graph = jraph.GraphsTuple(
      nodes=nodes,
      edges=np.ones((len(pairs), 1), np.float32),
      senders=np.ascontiguousarray(pairs[:, 0]),
      receivers=np.ascontiguousarray(pairs[:, 1]),
      n_node=np.asarray([len(nodes)], np.int32),
      n_edge=np.asarray([len(pairs)], np.int32),
      globals=np.zeros((1, 1), np.float32))
  if pad_nodes is None:
    if pad_edges is not None:
      raise ValueError("pad_edges: only allowed together with pad_nodes")
    return graph
  pad_edges = len(pairs) if pad_edges is None else pad_edges
  if pad_nodes <= len(nodes):
    raise ValueError(f"pad_nodes: {pad_nodes} must exceed the {len(nodes)} quantizer "
                     "nodes (jraph's padding graph needs at least one node)")
  if pad_edges < len(pairs):
    raise ValueError(f"pad_edges: {pad_edges} is smaller than the {len(pairs)} edges")
  return jraph.pad_with_graphs(graph, n_node=pad_nodes, n_edge=pad_edges, n_graph=2)


def policy_graph(workload: Workload, edges: str = "sequential",
                 node_features: Sequence[str] | None = None) -> jraph.GraphsTuple:
  """The GNN species' input: :func:`workload_graph` with the chosen feature columns.

  Args:
    workload: the workload.
    edges: ``"sequential"`` or ``"dataflow"`` (:func:`workload_graph`).
    node_features: names of the columns to keep (None: all of :func:`feature_names`).

  Raises:
    ValueError: a feature name this workload does not have (e.g. a site feature under
      the ``conv_inputs`` placement).
  """
  graph = workload_graph(workload, edges=edges)
  if node_features is None:
    return graph
  names = feature_names(workload)
  missing = [f for f in node_features if f not in names]
  if missing:
    raise ValueError(f"node_features: {missing} do not exist for this workload "
                     f"({workload.placement} placement); allowed: {list(names)}")
  columns = [names.index(f) for f in node_features]
  return graph._replace(nodes=graph.nodes[:, np.asarray(columns)])
