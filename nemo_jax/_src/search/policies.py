"""GNN policies of NEMO's two graph species: workload graph -> per-node bit-width logits.

A policy maps ONE workload graph (a ``jraph.GraphsTuple`` whose nodes are the quantizable
operations in execution order, features ``[N, F]``) to logits ``[N, n_choices]``; the
bit-width of node i is ``choices[argmax(logits[i])]`` (:func:`decode_logits`). The genome
of a GNN species member is the policy's parameter pytree (a plain dict of arrays), so a
species' population is one pytree with a leading member axis and is evaluated with
``jax.vmap(policy.apply, in_axes=(0, None))(population_params, graph)``; species of the
same structure can be stacked on a further leading axis and vmapped again. Parameters are
never trained by gradient: they evolve with the SSNE operators in ``operators.py``, which
is why initialisation matters (LeCun-normal weights, self-normalising under SELU, give
diverse but bounded random logits).

Conventions (choices the papers leave open, all documented here and exposed as options):

* Padding. The graph holds exactly one real workload graph, first; any further graphs
  (as added by ``jraph.pad_with_graphs``) are padding. By default the real nodes are
  ``arange(N_total) < graph.n_node[0]`` and the real edges the first ``graph.n_edge[0]``
  with both endpoints real; an explicit ``node_mask`` may be passed instead. Padded nodes
  send and receive no messages, take no part in pooling, and get zero logits, which
  decoding ignores (:func:`decode_logits` ``node_mask``). Real-node logits do not depend
  on the amount of padding.
* Edge direction. With ``undirected=True`` (default) every edge is used in both
  directions, in every message-passing layer (GCN, GAT, pooled GCNs): NEMO's sequential
  edges n1->n2->n3 then let a layer see both neighbours. Duplicate edges count with their
  multiplicity (deduplicate when building the graph if that is not wanted); edges given
  in both directions are therefore counted twice when ``undirected=True``.
* Self-loops are added by the layers (weight 1, as in Kipf & Welling and PyG's GCNConv);
  do not put self-loops into the workload graph.
* Features should be normalised by the graph builder (e.g. log channel counts,
  standardised columns): weights are random, so raw counts in the hundreds would
  saturate every SELU.
* Output. The paper describes the GCN species as ending in "Linear -> SELU". SELU is
  strictly increasing, so it cannot change the arg-max except by saturating very negative
  logits into ties; the default is therefore a plain Linear output, ``output_selu=True``
  restores the paper's literal form.

Everything here is pure, deterministic, static-shaped and jit/vmap/grad compatible.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import jraph

Params = dict
"""A policy's parameters: ``{layer_name: {tensor_name: array}}``."""

LEAKY_RELU_SLOPE = 0.2
"""Negative slope of the LeakyReLU in GAT attention logits (Velickovic et al. 2018)."""

_MASKED_LOGIT = -1e9
"""Attention logit given to padded edges: finite, so softmax never sees (-inf) - (-inf)."""

CONNECTIVITIES = ("a2", "a")


class GNNPolicy(NamedTuple):
  """A GNN policy as a pair of pure functions.

  Attributes:
    init: ``init(key, feature_dim) -> params`` (plain dict of float32 arrays).
    apply: ``apply(params, graph, node_mask=None) -> logits [N, n_choices]``; padded
      nodes get zero logits.
    name: a short name ("gcn" or "graph_unet").
    n_choices: number of logits per node (= number of bit-width choices).
  """
  init: Callable[[jax.Array, int], Params]
  apply: Callable[..., jax.Array]
  name: str
  n_choices: int


# --------------------------------------------------------------------------------------
# Graph plumbing
# --------------------------------------------------------------------------------------


def real_node_mask(graph: jraph.GraphsTuple) -> jax.Array:
  """Boolean mask ``[N_total]`` of the real nodes: those of the first graph in ``graph``.

  Correct both for an unpadded single graph (``n_node == [N]``) and for one padded by
  ``jraph.pad_with_graphs`` (``n_node == [N, pad, 0, ...]``).

  Args:
    graph: a GraphsTuple whose first graph is the workload graph.

  Returns:
    bool array ``[N_total]``.
  """
  num_nodes = graph.nodes.shape[0]
  return jnp.arange(num_nodes) < jnp.asarray(graph.n_node)[0]


def _node_inputs(graph: jraph.GraphsTuple, node_mask: jax.Array | None):
  """Node features (float32, padded rows zeroed) and the boolean node mask."""
  if graph.nodes is None or jnp.ndim(graph.nodes) != 2:
    raise ValueError(f"graph.nodes must be a [N, F] array, got "
                     f"{None if graph.nodes is None else jnp.shape(graph.nodes)}; "
                     "allowed: a 2-D float array")
  num_nodes = graph.nodes.shape[0]
  if node_mask is None:
    node_mask = real_node_mask(graph)
  else:
    node_mask = jnp.asarray(node_mask, bool)
    if node_mask.shape != (num_nodes,):
      raise ValueError(f"node_mask must have shape ({num_nodes},), got {node_mask.shape}")
  features = jnp.asarray(graph.nodes, jnp.float32) * node_mask[:, None]
  return features, node_mask


def message_edges(graph: jraph.GraphsTuple, node_mask: jax.Array, undirected: bool = True,
                  self_loops: bool = True):
  """Edge list used for message passing, with a validity mask (static shape).

  Args:
    graph: the workload GraphsTuple (edges beyond ``n_edge[0]`` are padding).
    node_mask: bool ``[N]`` real-node mask.
    undirected: also add every edge reversed.
    self_loops: append one self-loop per node (valid only on real nodes).

  Returns:
    ``(senders, receivers, valid)``: int32 ``[E']``, int32 ``[E']``, bool ``[E']``;
    ``E' = E * (2 if undirected else 1) + (N if self_loops else 0)``.
  """
  senders = jnp.asarray(graph.senders, jnp.int32)
  receivers = jnp.asarray(graph.receivers, jnp.int32)
  num_edges = senders.shape[0]
  valid = ((jnp.arange(num_edges) < jnp.asarray(graph.n_edge)[0])
           & node_mask[senders] & node_mask[receivers])
  if undirected:
    senders, receivers = (jnp.concatenate([senders, receivers]),
                          jnp.concatenate([receivers, senders]))
    valid = jnp.concatenate([valid, valid])
  if self_loops:
    node_ids = jnp.arange(node_mask.shape[0], dtype=jnp.int32)
    senders = jnp.concatenate([senders, node_ids])
    receivers = jnp.concatenate([receivers, node_ids])
    valid = jnp.concatenate([valid, node_mask])
  return senders, receivers, valid


def dense_adjacency(graph: jraph.GraphsTuple, node_mask: jax.Array,
                    undirected: bool = True) -> jax.Array:
  """Binary dense adjacency ``[N, N]`` without self-loops; ``A[r, s] = 1`` iff s -> r.

  Args:
    graph: the workload GraphsTuple.
    node_mask: bool ``[N]`` real-node mask (padded rows/columns are zero).
    undirected: symmetrise.

  Returns:
    float32 ``[N, N]`` of zeros and ones.
  """
  senders, receivers, valid = message_edges(graph, node_mask, undirected, self_loops=False)
  num_nodes = node_mask.shape[0]
  counts = jnp.zeros((num_nodes, num_nodes), jnp.float32).at[receivers, senders].add(
      valid.astype(jnp.float32))
  off_diagonal = 1.0 - jnp.eye(num_nodes, dtype=jnp.float32)
  return (counts > 0).astype(jnp.float32) * off_diagonal


# --------------------------------------------------------------------------------------
# Layers (each a pure function of one layer's parameters)
# --------------------------------------------------------------------------------------


class TensorSpec(NamedTuple):
  """Shape of one parameter tensor and the std of its normal initialisation (0: zeros)."""
  shape: tuple[int, ...]
  std: float


def _is_spec(node: Any) -> bool:
  return isinstance(node, TensorSpec)


def init_from_spec(key: jax.Array, spec: Any) -> Params:
  """Draw a parameter pytree from a pytree of :class:`TensorSpec`.

  One normal draw of the total size is sliced into the tensors: XLA compiles every PRNG
  call separately (slowly on CPU), so one draw keeps ``init`` cheap to compile.

  Args:
    key: PRNG key.
    spec: pytree whose leaves are TensorSpecs.

  Returns:
    the same pytree with float32 arrays ``N(0, std^2)`` of the given shapes.
  """
  specs, treedef = jax.tree_util.tree_flatten(spec, is_leaf=_is_spec)
  sizes = [math.prod(tensor.shape) for tensor in specs]
  draws = jax.random.normal(key, (sum(sizes),), jnp.float32)
  tensors, offset = [], 0
  for tensor, size in zip(specs, sizes):
    tensors.append(draws[offset:offset + size].reshape(tensor.shape) * tensor.std)
    offset += size
  return jax.tree_util.tree_unflatten(treedef, tensors)


def dense_spec(in_dim: int, out_dim: int) -> dict:
  """Linear layer: LeCun-normal ``w [in, out]`` (std 1/sqrt(in), suits SELU), zero ``b``."""
  return {"w": TensorSpec((in_dim, out_dim), 1.0 / math.sqrt(in_dim)),
          "b": TensorSpec((out_dim,), 0.0)}


def gat_spec(in_dim: int, out_dim: int, heads: int) -> dict:
  """GAT layer: ``w [in, heads*out]``, attention vectors ``a_src, a_dst [heads, out]``,
  bias ``b [heads*out]`` (heads are concatenated, as PyG's ``GATConv(concat=True)``)."""
  return {"w": TensorSpec((in_dim, heads * out_dim), 1.0 / math.sqrt(in_dim)),
          "a_src": TensorSpec((heads, out_dim), 1.0 / math.sqrt(out_dim)),
          "a_dst": TensorSpec((heads, out_dim), 1.0 / math.sqrt(out_dim)),
          "b": TensorSpec((heads * out_dim,), 0.0)}


def gcn_conv(layer: Params, features: jax.Array, senders: jax.Array, receivers: jax.Array,
             valid: jax.Array) -> jax.Array:
  """GCN convolution (Kipf & Welling) over an edge list with segment sums.

  ``out = D^-1/2 (A + I) D^-1/2 X W + b`` where the edge list already contains the
  self-loops (:func:`message_edges`) and ``D`` is the in-degree over it; for an
  undirected edge list this is the symmetric normalisation.

  Args:
    layer: ``{"w": [F, H], "b": [H]}``.
    features: ``[N, F]``.
    senders, receivers: int ``[E']``.
    valid: bool ``[E']``; invalid edges carry nothing and count for no degree.

  Returns:
    ``[N, H]`` (rows of nodes without valid in-edges are just ``b``; mask them outside).
  """
  num_nodes = features.shape[0]
  transformed = features @ layer["w"]
  edge_weight = valid.astype(transformed.dtype)
  degree = jax.ops.segment_sum(edge_weight, receivers, num_nodes)
  inv_sqrt_degree = jnp.where(degree > 0, jax.lax.rsqrt(jnp.maximum(degree, 1e-12)), 0.0)
  norm = edge_weight * inv_sqrt_degree[senders] * inv_sqrt_degree[receivers]
  messages = norm[:, None] * transformed[senders]
  return jax.ops.segment_sum(messages, receivers, num_nodes) + layer["b"]


def gat_conv(layer: Params, features: jax.Array, senders: jax.Array, receivers: jax.Array,
             valid: jax.Array, return_attention: bool = False):
  """Graph attention (GAT v1, Velickovic et al. 2018), multi-head, heads concatenated.

  ``e_ij = LeakyReLU(a_src . W h_j + a_dst . W h_i)`` for each edge j -> i (self-loops
  included via the edge list), ``alpha_ij = softmax_j(e_ij)`` over node i's valid incoming
  edges (``jraph.segment_softmax``), ``out_i = concat_heads(sum_j alpha_ij W h_j) + b``.

  Args:
    layer: ``{"w": [F, heads*C], "a_src": [heads, C], "a_dst": [heads, C], "b": [heads*C]}``.
    features: ``[N, F]``.
    senders, receivers: int ``[E']``.
    valid: bool ``[E']``.
    return_attention: also return ``alpha [E', heads]`` (zero on invalid edges; sums to
      one over each real node's incoming edges).

  Returns:
    ``[N, heads*C]``, or ``(out, alpha)`` if ``return_attention``.
  """
  num_nodes = features.shape[0]
  heads, head_dim = layer["a_src"].shape
  transformed = (features @ layer["w"]).reshape(num_nodes, heads, head_dim)
  source_score = jnp.sum(transformed * layer["a_src"], axis=-1)  # [N, heads]
  target_score = jnp.sum(transformed * layer["a_dst"], axis=-1)
  logits = jax.nn.leaky_relu(source_score[senders] + target_score[receivers],
                             LEAKY_RELU_SLOPE)
  logits = jnp.where(valid[:, None], logits, _MASKED_LOGIT)
  alpha = jraph.segment_softmax(logits, receivers, num_nodes)
  alpha = alpha * valid[:, None].astype(alpha.dtype)
  messages = alpha[..., None] * transformed[senders]
  out = jax.ops.segment_sum(messages, receivers, num_nodes).reshape(num_nodes, heads * head_dim)
  out = out + layer["b"]
  return (out, alpha) if return_attention else out


def dense_gcn_conv(layer: Params, features: jax.Array, adjacency: jax.Array,
                   node_mask: jax.Array) -> jax.Array:
  """GCN convolution with a dense adjacency (used on pooled, static-size graphs).

  Args:
    layer: ``{"w": [F, H], "b": [H]}``.
    features: ``[n, F]``.
    adjacency: ``[n, n]`` without self-loops, zero on masked rows/columns.
    node_mask: bool ``[n]``; self-loops are added on these nodes only.

  Returns:
    ``[n, H]``, masked rows zeroed.
  """
  mask = node_mask.astype(features.dtype)
  adjacency_hat = adjacency + jnp.diag(mask)
  degree = adjacency_hat.sum(axis=1)
  inv_sqrt_degree = jnp.where(degree > 0, jax.lax.rsqrt(jnp.maximum(degree, 1e-12)), 0.0)
  normalised = inv_sqrt_degree[:, None] * adjacency_hat * inv_sqrt_degree[None, :]
  out = normalised @ (features @ layer["w"]) + layer["b"]
  return out * mask[:, None]


def pool_size_table(num_nodes: int, ratio: float) -> tuple[int, ...]:
  """Number of nodes gPool keeps for every possible real-node count ``0..num_nodes``.

  ``k(n) = min(n, max(1, ceil(ratio * n)))`` (``k(0) = 0``), computed once in Python so
  the traced (dynamic) count and the static slot count agree exactly.

  Args:
    num_nodes: static node count of the level.
    ratio: pooling ratio in (0, 1].

  Returns:
    tuple of ``num_nodes + 1`` ints; the last is the static number of slots.
  """
  table = [0]
  for n in range(1, num_nodes + 1):
    table.append(min(n, max(1, math.ceil(ratio * n - 1e-9))))
  return tuple(table)


def graph_pool(projection: jax.Array, features: jax.Array, adjacency: jax.Array,
               node_mask: jax.Array, ratio: float, connectivity: str = "a2"):
  """gPool (Gao & Ji 2019) with static shapes.

  Scores ``y = X p / ||p||``; the ``k = ceil(ratio * n_real)`` best real nodes are kept
  (``lax.top_k`` over ``k_static = ceil(ratio * N)`` slots, padded nodes scored -inf,
  slots beyond k masked; ties go to the lower index); kept features are gated,
  ``X' = X[idx] * sigmoid(y[idx])``. The pooled adjacency is ``A2[idx, idx]`` with
  ``A2 = bin(A + A @ A)`` ("a2", Gao & Ji's graph-connectivity augmentation: on NEMO's
  chain graphs pooling with plain A would disconnect almost every kept node) or
  ``A[idx, idx]`` ("a"); edges survive only between kept nodes.

  Args:
    projection: ``[H]`` learnable projection vector p.
    features: ``[n, H]``.
    adjacency: ``[n, n]`` binary, no self-loops.
    node_mask: bool ``[n]``.
    ratio: pooling ratio in (0, 1].
    connectivity: "a2" or "a".

  Returns:
    ``(indices [k], kept bool [k], pooled_features [k, H], pooled_adjacency [k, k])``.
  """
  num_nodes = features.shape[0]
  sizes = pool_size_table(num_nodes, ratio)
  num_slots = sizes[-1]
  projection_norm = jnp.sqrt(jnp.sum(projection ** 2) + 1e-12)
  score = features @ projection / projection_norm
  ranked_score = jnp.where(node_mask, score, -jnp.inf)
  _, indices = jax.lax.top_k(ranked_score, num_slots)
  num_kept = jnp.asarray(sizes, jnp.int32)[jnp.sum(node_mask.astype(jnp.int32))]
  kept = (jnp.arange(num_slots) < num_kept) & node_mask[indices]
  kept_float = kept.astype(features.dtype)
  gate = jax.nn.sigmoid(score[indices])
  pooled_features = features[indices] * (gate * kept_float)[:, None]
  if connectivity == "a2":
    reach = adjacency + adjacency @ adjacency
    off_diagonal = 1.0 - jnp.eye(num_nodes, dtype=adjacency.dtype)
    adjacency = (reach > 0).astype(adjacency.dtype) * off_diagonal
  pooled_adjacency = adjacency[indices][:, indices] * kept_float[:, None] * kept_float[None, :]
  return indices, kept, pooled_features, pooled_adjacency


def graph_unpool(features: jax.Array, indices: jax.Array, kept: jax.Array,
                 num_nodes: int) -> jax.Array:
  """gUnpool: put pooled rows back at their original positions, zeros elsewhere."""
  rows = features * kept[:, None].astype(features.dtype)
  return jnp.zeros((num_nodes, features.shape[1]), features.dtype).at[indices].add(rows)


# --------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _head(params: Params, hidden: jax.Array, senders, receivers, valid, node_mask,
          output_selu: bool) -> jax.Array:
  """Shared tail: GAT -> SELU -> Linear (-> SELU) -> mask padded nodes."""
  mask = node_mask[:, None].astype(hidden.dtype)
  hidden = jax.nn.selu(gat_conv(params["gat"], hidden, senders, receivers, valid)) * mask
  logits = hidden @ params["linear"]["w"] + params["linear"]["b"]
  if output_selu:
    logits = jax.nn.selu(logits)
  return logits * mask


def gcn_policy(hidden: int = 32, n_choices: int = 7, heads: int = 1, undirected: bool = True,
               output_selu: bool = False) -> GNNPolicy:
  """NEMO's "GCN" species: GCNConv -> SELU -> GAT -> SELU -> Linear.

  Args:
    hidden: hidden width of the GCN and of each GAT head.
    n_choices: logits per node (number of bit-width choices).
    heads: GAT attention heads (concatenated, so the Linear sees ``heads * hidden``).
    undirected: use every edge in both directions (module docstring).
    output_selu: apply SELU to the logits (the paper's literal "Linear -> SELU").

  Returns:
    a :class:`GNNPolicy`; params ``{"gcn", "gat", "linear"}``.
  """
  for name, value in (("hidden", hidden), ("n_choices", n_choices), ("heads", heads)):
    _check_positive_int(name, value)

  def init(key: jax.Array, feature_dim: int) -> Params:
    _check_positive_int("feature_dim", feature_dim)
    return init_from_spec(key, {"gcn": dense_spec(feature_dim, hidden),
                                "gat": gat_spec(hidden, hidden, heads),
                                "linear": dense_spec(heads * hidden, n_choices)})

  def apply(params: Params, graph: jraph.GraphsTuple,
            node_mask: jax.Array | None = None) -> jax.Array:
    features, node_mask = _node_inputs(graph, node_mask)
    senders, receivers, valid = message_edges(graph, node_mask, undirected)
    mask = node_mask[:, None].astype(jnp.float32)
    hidden_features = jax.nn.selu(
        gcn_conv(params["gcn"], features, senders, receivers, valid)) * mask
    return _head(params, hidden_features, senders, receivers, valid, node_mask, output_selu)

  return GNNPolicy(init=init, apply=apply, name="gcn", n_choices=n_choices)


def graph_unet_policy(hidden: int = 32, n_choices: int = 7, depth: int = 1,
                      pool_ratio: float = 0.5, heads: int = 1, undirected: bool = True,
                      connectivity: str = "a2", output_selu: bool = False) -> GNNPolicy:
  """NEMO's "Graph U-Net" species: Graph U-Net -> SELU -> GAT -> SELU -> Linear.

  The U-Net block follows Gao & Ji (2019) / PyG's ``GraphUNet``: ``down_0`` GCN on the
  workload graph; for each level i = 1..depth: gPool (:func:`graph_pool`), ``down_i`` GCN
  on the pooled graph; then for i = depth-1..0: gUnpool to level i, add the level-i skip
  features (additive skip connection), ``up_i`` GCN on level i. Every GCN is followed by
  SELU (the block's last one by the policy's "-> SELU"). Level 0 GCNs use edge lists;
  pooled levels use dense ``[k, k]`` adjacencies (static ``k = ceil(ratio * N)`` slots,
  dynamic ``ceil(ratio * n_real)`` of them live), so shapes never depend on the data.
  Padding changes the number of slots but not which real nodes are kept.

  Args:
    hidden: hidden width of all GCNs and of each GAT head.
    n_choices: logits per node.
    depth: number of pooling levels (>= 1).
    pool_ratio: fraction of (real) nodes each gPool keeps, in (0, 1].
    heads: GAT heads.
    undirected: use every edge in both directions.
    connectivity: pooled-graph connectivity, "a2" (A + A^2, Gao & Ji) or "a".
    output_selu: apply SELU to the logits.

  Returns:
    a :class:`GNNPolicy`; params ``{"unet_down_0", "unet_pool_i", "unet_down_i",
    "unet_up_j", "gat", "linear"}`` (i = 1..depth, j = 0..depth-1).
  """
  for name, value in (("hidden", hidden), ("n_choices", n_choices), ("depth", depth),
                      ("heads", heads)):
    _check_positive_int(name, value)
  if not 0.0 < float(pool_ratio) <= 1.0:
    raise ValueError(f"pool_ratio must be in (0, 1], got {pool_ratio!r}")
  if connectivity not in CONNECTIVITIES:
    raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity!r}")
  pool_ratio = float(pool_ratio)

  def init(key: jax.Array, feature_dim: int) -> Params:
    _check_positive_int("feature_dim", feature_dim)
    spec = {"unet_down_0": dense_spec(feature_dim, hidden)}
    for level in range(1, depth + 1):
      spec[f"unet_pool_{level}"] = {"p": TensorSpec((hidden,), 1.0 / math.sqrt(hidden))}
      spec[f"unet_down_{level}"] = dense_spec(hidden, hidden)
    for level in range(depth):
      spec[f"unet_up_{level}"] = dense_spec(hidden, hidden)
    spec["gat"] = gat_spec(hidden, hidden, heads)
    spec["linear"] = dense_spec(heads * hidden, n_choices)
    return init_from_spec(key, spec)

  def apply(params: Params, graph: jraph.GraphsTuple,
            node_mask: jax.Array | None = None) -> jax.Array:
    features, node_mask = _node_inputs(graph, node_mask)
    num_nodes = features.shape[0]
    senders, receivers, valid = message_edges(graph, node_mask, undirected)
    adjacency = dense_adjacency(graph, node_mask, undirected)
    mask = node_mask[:, None].astype(jnp.float32)

    x = jax.nn.selu(gcn_conv(params["unet_down_0"], features, senders, receivers, valid))
    x = x * mask
    # Per level: skip features, adjacency, node mask (level 0 = the workload graph).
    skips, adjacencies, masks, pools = [x], [adjacency], [node_mask], []
    for level in range(1, depth + 1):
      indices, kept, pooled, pooled_adjacency = graph_pool(
          params[f"unet_pool_{level}"]["p"], skips[-1], adjacencies[-1], masks[-1],
          pool_ratio, connectivity)
      x = jax.nn.selu(dense_gcn_conv(params[f"unet_down_{level}"], pooled,
                                     pooled_adjacency, kept))
      x = x * kept[:, None].astype(x.dtype)
      pools.append((indices, kept))
      if level < depth:
        skips.append(x)
        adjacencies.append(pooled_adjacency)
        masks.append(kept)
    for level in reversed(range(depth)):
      indices, kept = pools[level]
      x = skips[level] + graph_unpool(x, indices, kept, skips[level].shape[0])
      if level == 0:
        x = gcn_conv(params["unet_up_0"], x, senders, receivers, valid)
      else:
        x = dense_gcn_conv(params[f"unet_up_{level}"], x, adjacencies[level], masks[level])
      x = jax.nn.selu(x) * masks[level][:, None].astype(x.dtype)
    assert x.shape[0] == num_nodes
    return _head(params, x, senders, receivers, valid, node_mask, output_selu)

  return GNNPolicy(init=init, apply=apply, name="graph_unet", n_choices=n_choices)


# --------------------------------------------------------------------------------------
# Decoding and parameter bookkeeping
# --------------------------------------------------------------------------------------


def decode_logits(logits: jax.Array, choices: Sequence[int] | jax.Array,
                  node_mask: jax.Array | None = None, fill_value: int = 0) -> jax.Array:
  """Per-node bit-widths: ``choices[argmax(logits, -1)]`` (ties -> the first choice).

  Args:
    logits: ``[..., N, n_choices]`` (any leading population/species axes).
    choices: ``[n_choices]`` bit-width values, e.g. ``[2, 3, 4, 5, 6, 7, 8]``.
    node_mask: optional bool ``[N]``; padded nodes get ``fill_value`` instead.
    fill_value: value for padded nodes.

  Returns:
    int32 ``[..., N]``.
  """
  choices = jnp.asarray(choices)
  if choices.ndim != 1 or choices.shape[0] != logits.shape[-1]:
    raise ValueError(f"choices must be 1-D with len == logits.shape[-1] == "
                     f"{logits.shape[-1]}, got shape {choices.shape}")
  bits = choices.astype(jnp.int32)[jnp.argmax(logits, axis=-1)]
  if node_mask is not None:
    bits = jnp.where(jnp.asarray(node_mask, bool), bits, jnp.int32(fill_value))
  return bits


def param_count(params: Any, batch_dims: int = 0) -> int:
  """Number of scalars in a parameter pytree, ignoring ``batch_dims`` leading axes.

  Args:
    params: pytree of arrays (one member, or a population with ``batch_dims`` axes).
    batch_dims: leading (population / species) axes not to count.

  Returns:
    int.
  """
  return sum(math.prod(jnp.shape(leaf)[batch_dims:]) for leaf in jax.tree_util.tree_leaves(params))


def _path_names(path) -> list[str]:
  names = []
  for entry in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(entry, attribute):
        names.append(str(getattr(entry, attribute)))
        break
    else:
      names.append(str(entry))
  return names


def param_layers(params: Any) -> tuple[tuple[str, tuple[int, ...], tuple[str, ...]], ...]:
  """The "layers" of a parameter pytree, as used by the SSNE operators.

  A layer is the innermost container holding a tensor: the tensors ``gat/w``,
  ``gat/b``, ... form layer ``"gat"``; in a genome that nests the policy, e.g.
  ``{"policy": {...}, "keep_logits": x}``, the layers are ``"policy/gat"``, ... and a
  tensor sitting directly at the top (``"keep_logits"``) is a layer of its own. Leaf
  indices follow ``jax.tree_util.tree_leaves(params)`` order.

  Args:
    params: a policy's parameter pytree (with or without population axes).

  Returns:
    tuple of ``(layer_name, leaf_indices, leaf_paths)``, layers in order of first leaf,
    e.g. ``("gat", (0, 1, 2, 3), ("gat/a_dst", "gat/a_src", "gat/b", "gat/w"))``.
  """
  leaves_with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  layers: dict[str, tuple[list[int], list[str]]] = {}
  for leaf_index, (path, _) in enumerate(leaves_with_paths):
    names = _path_names(path)
    layer_name = "/".join(names[:-1]) if len(names) > 1 else "/".join(names)
    indices, paths = layers.setdefault(layer_name, ([], []))
    indices.append(leaf_index)
    paths.append("/".join(names))
  return tuple((name, tuple(indices), tuple(paths)) for name, (indices, paths) in layers.items())
