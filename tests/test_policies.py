"""Tests of NEMO's GNN policies against dense numpy references and graph symmetries."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from nemo_jax._src.search import policies

NUM_NODES, FEATURES, HIDDEN = 10, 4, 8
CHOICES = jnp.array([2, 3, 4, 5, 6, 7, 8])

POLICIES = {
    "gcn": policies.gcn_policy(hidden=HIDDEN, n_choices=7, heads=2),
    "unet": policies.graph_unet_policy(hidden=HIDDEN, n_choices=7, depth=1, pool_ratio=0.5),
    "unet2": policies.graph_unet_policy(hidden=HIDDEN, n_choices=7, depth=2, pool_ratio=0.6,
                                        heads=2),
}
APPLY = {name: jax.jit(policy.apply) for name, policy in POLICIES.items()}
INIT = {name: jax.jit(policy.init, static_argnums=1) for name, policy in POLICIES.items()}


def make_graph(num_nodes=NUM_NODES, seed=0, extra_edges=((0, 3), (2, 7), (5, 9))):
  """Sequential chain plus a few skip (data-flow) edges, random features."""
  rng = np.random.default_rng(seed)
  senders = list(range(num_nodes - 1)) + [s for s, r in extra_edges if r < num_nodes]
  receivers = list(range(1, num_nodes)) + [r for s, r in extra_edges if r < num_nodes]
  return jraph.GraphsTuple(
      nodes=rng.normal(size=(num_nodes, FEATURES)).astype(np.float32), edges=None,
      globals=None, senders=np.array(senders, np.int32), receivers=np.array(receivers, np.int32),
      n_node=np.array([num_nodes], np.int32), n_edge=np.array([len(senders)], np.int32))


GRAPH = make_graph()


def params_for(name, seed=0):
  return INIT[name](jax.random.key(seed), FEATURES)


# --------------------------------------------------------------------------------------
# Dense numpy references (float64, no jraph, no masking tricks: pooled graphs really shrink)
# --------------------------------------------------------------------------------------


def np_selu(x):
  return 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(np.minimum(x, 0)))


def np_adjacency(graph, undirected=True):
  """Edge multiplicities A[r, s] (no self-loops added)."""
  n = graph.nodes.shape[0]
  counts = np.zeros((n, n))
  for s, r in zip(graph.senders, graph.receivers):
    counts[r, s] += 1
    if undirected:
      counts[s, r] += 1
  return counts


def np_gcn(layer, x, counts):
  """D^-1/2 (A + I) D^-1/2 X W + b."""
  a_hat = counts + np.eye(len(counts))
  inv_sqrt = 1.0 / np.sqrt(a_hat.sum(1))
  return (inv_sqrt[:, None] * a_hat * inv_sqrt[None, :]) @ x @ np.asarray(layer["w"], np.float64) \
      + np.asarray(layer["b"], np.float64)


def np_gat(layer, x, counts, return_attention=False):
  """Dense GAT v1 with self-loops; a multi-edge of multiplicity m weighs m * exp(e)."""
  a_src, a_dst = (np.asarray(layer[k], np.float64) for k in ("a_src", "a_dst"))
  heads, head_dim = a_src.shape
  n = len(x)
  h = (x @ np.asarray(layer["w"], np.float64)).reshape(n, heads, head_dim)
  multiplicity = counts + np.eye(n)
  out = np.zeros((n, heads, head_dim))
  attention = np.zeros((heads, n, n))
  for head in range(heads):
    source = h[:, head] @ a_src[head]
    target = h[:, head] @ a_dst[head]
    logits = target[:, None] + source[None, :]  # [receiver, sender]
    logits = np.where(logits > 0, logits, 0.2 * logits)
    weights = multiplicity * np.exp(logits - logits.max(axis=1, keepdims=True))
    alpha = weights / weights.sum(axis=1, keepdims=True)
    attention[head] = alpha
    out[:, head] = alpha @ h[:, head]
  out = out.reshape(n, heads * head_dim) + np.asarray(layer["b"], np.float64)
  return (out, attention) if return_attention else out


def np_head(params, h, counts):
  h = np_selu(np_gat(params["gat"], h, counts))
  return h @ np.asarray(params["linear"]["w"], np.float64) + np.asarray(params["linear"]["b"],
                                                                         np.float64)


def np_gcn_policy(params, graph):
  x = np.asarray(graph.nodes, np.float64)
  counts = np_adjacency(graph)
  return np_head(params, np_selu(np_gcn(params["gcn"], x, counts)), counts)


def np_unet_policy(params, graph, depth, ratio):
  x = np.asarray(graph.nodes, np.float64)
  counts = np_adjacency(graph)
  binary = (counts > 0).astype(float)
  x = np_selu(np_gcn(params["unet_down_0"], x, counts))
  skips, adjacencies, pooled_indices = [x], [counts], []
  adjacency = binary
  for level in range(1, depth + 1):
    n = len(x)
    k = min(n, max(1, math.ceil(ratio * n - 1e-9)))
    p = np.asarray(params[f"unet_pool_{level}"]["p"], np.float64)
    score = x @ p / np.linalg.norm(p)
    indices = np.argsort(-score, kind="stable")[:k]
    pooled = x[indices] * (1 / (1 + np.exp(-score[indices])))[:, None]
    reach = ((adjacency + adjacency @ adjacency) > 0).astype(float) * (1 - np.eye(n))
    adjacency = reach[np.ix_(indices, indices)]
    x = np_selu(np_gcn(params[f"unet_down_{level}"], pooled, adjacency))
    pooled_indices.append(indices)
    if level < depth:
      skips.append(x)
      adjacencies.append(adjacency)
  for level in reversed(range(depth)):
    unpooled = np.zeros_like(skips[level])
    unpooled[pooled_indices[level]] = x
    x = np_selu(np_gcn(params[f"unet_up_{level}"], skips[level] + unpooled, adjacencies[level]))
  return np_head(params, x, counts)


def reference_logits(name, params, graph):
  if name == "gcn":
    return np_gcn_policy(params, graph)
  depth, ratio = {"unet": (1, 0.5), "unet2": (2, 0.6)}[name]
  return np_unet_policy(params, graph, depth, ratio)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


def test_gcn_layer_matches_dense_formula():
  layer = policies.init_from_spec(jax.random.key(1), policies.dense_spec(FEATURES, 5))
  layer["b"] = layer["b"] + 0.3
  mask = policies.real_node_mask(GRAPH)
  senders, receivers, valid = policies.message_edges(GRAPH, mask)
  got = policies.gcn_conv(layer, jnp.asarray(GRAPH.nodes), senders, receivers, valid)
  want = np_gcn(layer, np.asarray(GRAPH.nodes, np.float64), np_adjacency(GRAPH))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Directed variant: in-degree normalisation over s -> r edges plus self-loops.
  senders, receivers, valid = policies.message_edges(GRAPH, mask, undirected=False)
  got = policies.gcn_conv(layer, jnp.asarray(GRAPH.nodes), senders, receivers, valid)
  want = np_gcn(layer, np.asarray(GRAPH.nodes, np.float64), np_adjacency(GRAPH, False))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 3])
def test_gat_layer_matches_dense_reference_and_attention_sums_to_one(heads):
  layer = policies.init_from_spec(jax.random.key(2), policies.gat_spec(FEATURES, 5, heads))
  mask = policies.real_node_mask(GRAPH)
  senders, receivers, valid = policies.message_edges(GRAPH, mask)
  got, alpha = policies.gat_conv(layer, jnp.asarray(GRAPH.nodes), senders, receivers, valid,
                                 return_attention=True)
  want, want_alpha = np_gat(layer, np.asarray(GRAPH.nodes, np.float64), np_adjacency(GRAPH),
                            return_attention=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  sums = jax.ops.segment_sum(alpha, receivers, NUM_NODES)
  np.testing.assert_allclose(sums, np.ones((NUM_NODES, heads)), atol=1e-6)
  for edge, (s, r) in enumerate(zip(np.asarray(senders), np.asarray(receivers))):
    np.testing.assert_allclose(alpha[edge], want_alpha[:, r, s], atol=1e-6)


pool_jit = jax.jit(policies.graph_pool, static_argnums=(4,))


@given(num_real=st.integers(0, 12), ratio=st.sampled_from([0.3, 0.5, 1.0]))
@settings(max_examples=15, deadline=None)
def test_pool_keeps_ceil_ratio_of_real_nodes(num_real, ratio):
  num_nodes = 12
  rng = np.random.default_rng(num_real)
  features = jnp.asarray(rng.normal(size=(num_nodes, 3)), jnp.float32)
  mask = jnp.arange(num_nodes) < num_real
  adjacency = jnp.zeros((num_nodes, num_nodes))
  indices, kept, pooled, _ = pool_jit(jnp.ones(3), features, adjacency, mask, ratio)
  want = 0 if num_real == 0 else min(num_real, max(1, math.ceil(ratio * num_real - 1e-9)))
  assert int(kept.sum()) == want
  assert kept.shape == (math.ceil(ratio * num_nodes - 1e-9),)
  assert np.all(np.asarray(indices)[np.asarray(kept)] < num_real)  # only real nodes kept
  scores = np.asarray(features.sum(1))
  best = np.argsort(-scores[:num_real], kind="stable")[:want]
  np.testing.assert_array_equal(np.asarray(indices)[:want], best)
  np.testing.assert_allclose(np.asarray(pooled)[~np.asarray(kept)], 0.0)


# --------------------------------------------------------------------------------------
# Whole policies
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_matches_dense_numpy_reference(name):
  params = params_for(name, seed=3)
  # Non-zero biases so the bias paths are exercised too.
  params = jax.tree_util.tree_map(lambda x: x + 0.05 if x.ndim == 1 else x, params)
  graph = make_graph(seed=4)
  got = APPLY[name](params, graph)
  assert got.shape == (NUM_NODES, 7) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, reference_logits(name, params, graph), rtol=1e-4, atol=1e-4)
  bits = policies.decode_logits(got, CHOICES)
  assert bits.shape == (NUM_NODES,)
  assert set(np.asarray(bits).tolist()) <= set(range(2, 9))


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_is_permutation_equivariant(name):
  params = params_for(name, seed=5)
  rng = np.random.default_rng(6)
  permutation = rng.permutation(NUM_NODES)  # new node i is old node permutation[i]
  inverse = np.argsort(permutation)
  edge_order = rng.permutation(len(GRAPH.senders))
  permuted = GRAPH._replace(nodes=GRAPH.nodes[permutation],
                            senders=inverse[GRAPH.senders][edge_order].astype(np.int32),
                            receivers=inverse[GRAPH.receivers][edge_order].astype(np.int32))
  original = APPLY[name](params, GRAPH)
  np.testing.assert_allclose(APPLY[name](params, permuted), original[permutation], rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("name", list(POLICIES))
def test_padding_does_not_change_real_logits(name):
  params = params_for(name, seed=7)
  padded = jraph.pad_with_graphs(GRAPH, NUM_NODES + 6, len(GRAPH.senders) + 5, n_graph=3)
  original = APPLY[name](params, GRAPH)
  logits = APPLY[name](params, padded)
  assert logits.shape == (NUM_NODES + 6, 7)
  np.testing.assert_allclose(logits[:NUM_NODES], original, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(logits[NUM_NODES:], 0.0)
  bits = policies.decode_logits(logits, CHOICES, node_mask=policies.real_node_mask(padded))
  np.testing.assert_array_equal(bits[:NUM_NODES], policies.decode_logits(original, CHOICES))
  np.testing.assert_array_equal(bits[NUM_NODES:], 0)


@pytest.mark.parametrize("name", ["gcn", "unet"])
def test_explicit_node_mask_equals_removing_the_nodes(name):
  params = params_for(name, seed=8)
  small = make_graph(NUM_NODES - 3, seed=9)  # chain 0..6 + skip (0, 3): nodes 7..9 removed
  rng = np.random.default_rng(10)
  big = make_graph(seed=9)._replace(nodes=np.concatenate(
      [small.nodes, rng.normal(size=(3, FEATURES)).astype(np.float32)]))
  mask = jnp.arange(NUM_NODES) < NUM_NODES - 3
  np.testing.assert_allclose(APPLY[name](params, big, mask)[:NUM_NODES - 3],
                             APPLY[name](params, small), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gcn", "unet"])
def test_vmap_over_members_and_species_equals_loop(name):
  keys = jax.random.split(jax.random.key(11), 8)
  population = jax.vmap(INIT[name], in_axes=(0, None))(keys, FEATURES)
  batched = jax.jit(jax.vmap(POLICIES[name].apply, in_axes=(0, None)))(population, GRAPH)
  assert batched.shape == (8, NUM_NODES, 7)
  for member in range(8):
    params = jax.tree_util.tree_map(lambda x, m=member: x[m], population)
    np.testing.assert_allclose(batched[member], APPLY[name](params, GRAPH), rtol=1e-5,
                               atol=1e-5)
  # Two species of the same structure stacked on a leading axis (2 x 4 members).
  species = jax.tree_util.tree_map(lambda x: x.reshape((2, 4) + x.shape[1:]), population)
  nested = jax.jit(jax.vmap(jax.vmap(POLICIES[name].apply, in_axes=(0, None)),
                            in_axes=(0, None)))(species, GRAPH)
  np.testing.assert_allclose(nested.reshape(batched.shape), batched, rtol=1e-5, atol=1e-5)
  assert len({tuple(np.asarray(policies.decode_logits(b, CHOICES))) for b in batched}) > 1


@pytest.mark.parametrize("name", ["gcn", "unet"])
def test_no_nan_for_extreme_inputs_and_gradients_are_finite(name):
  params = params_for(name, seed=12)
  loud = GRAPH._replace(nodes=GRAPH.nodes * 1e4)
  big_params = jax.tree_util.tree_map(lambda x: x * 30.0, params)
  assert np.all(np.isfinite(APPLY[name](big_params, loud)))
  gradients = jax.jit(jax.grad(lambda p: jnp.sum(POLICIES[name].apply(p, GRAPH) ** 2)))(params)
  leaves = jax.tree_util.tree_leaves(gradients)
  assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
  assert sum(float(jnp.abs(leaf).sum()) > 0 for leaf in leaves) >= len(leaves) - 1


def test_apply_is_deterministic_and_output_selu_keeps_argmax():
  params = params_for("gcn", seed=13)
  first, second = APPLY["gcn"](params, GRAPH), APPLY["gcn"](params, GRAPH)
  np.testing.assert_array_equal(first, second)
  with_selu = jax.jit(policies.gcn_policy(hidden=HIDDEN, heads=2, output_selu=True).apply)
  np.testing.assert_allclose(with_selu(params, GRAPH), np_selu(np.asarray(first, np.float64)),
                             rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Decoding and bookkeeping
# --------------------------------------------------------------------------------------


def test_decode_logits_hand_computed():
  logits = jnp.array([[0.1, 0.9, 0.0], [2.0, 2.0, 1.0], [-1.0, -3.0, -0.5]])
  np.testing.assert_array_equal(policies.decode_logits(logits, jnp.array([2, 4, 8])), [4, 2, 8])
  np.testing.assert_array_equal(
      policies.decode_logits(logits, [2, 4, 8], node_mask=jnp.array([1, 0, 1], bool),
                             fill_value=-1), [4, -1, 8])
  stacked = jnp.stack([logits, -logits])
  assert policies.decode_logits(stacked, [2, 4, 8]).shape == (2, 3)
  with pytest.raises(ValueError, match="choices"):
    policies.decode_logits(logits, jnp.arange(2, 9))


def test_param_count_and_layers():
  heads, hidden, choices = 2, HIDDEN, 7
  params = params_for("gcn")
  want = (FEATURES * hidden + hidden) + (hidden * heads * hidden + 2 * heads * hidden
                                         + heads * hidden) + (heads * hidden * choices + choices)
  assert policies.param_count(params) == want
  population = jax.vmap(INIT["gcn"], in_axes=(0, None))(jax.random.split(jax.random.key(0), 3),
                                                       FEATURES)
  assert policies.param_count(population, batch_dims=1) == want
  layers = policies.param_layers(params)
  assert [name for name, _, _ in layers] == ["gat", "gcn", "linear"]
  assert sorted(i for _, indices, _ in layers for i in indices) == list(range(8))
  assert layers[0][2] == ("gat/a_dst", "gat/a_src", "gat/b", "gat/w")
  genome = {"policy": params, "keep_logits": jnp.zeros(3)}
  assert [name for name, _, _ in policies.param_layers(genome)] == [
      "keep_logits", "policy/gat", "policy/gcn", "policy/linear"]
  unet_layers = [name for name, _, _ in policies.param_layers(params_for("unet2"))]
  assert {"unet_down_0", "unet_pool_1", "unet_pool_2", "unet_up_0", "unet_up_1"} <= set(
      unet_layers)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="hidden"):
    policies.gcn_policy(hidden=0)
  with pytest.raises(ValueError, match="pool_ratio"):
    policies.graph_unet_policy(pool_ratio=0.0)
  with pytest.raises(ValueError, match="connectivity"):
    policies.graph_unet_policy(connectivity="a3")
  with pytest.raises(ValueError, match="feature_dim"):
    POLICIES["gcn"].init(jax.random.key(0), 0)
  with pytest.raises(ValueError, match="node_mask"):
    POLICIES["gcn"].apply(params_for("gcn"), GRAPH, jnp.ones(3, bool))
