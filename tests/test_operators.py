"""Tests of the NEMO variation/selection operators against independent references.

References: a straightforward numpy transcription of Deb's NSGA-II C code (``realcross``,
``real_mutate_ind``) fed the same uniforms; pymoo's ``cross_sbx`` / ``mut_pm``
(two-sample KS tests); closed-form tournament probabilities; hand-computed decodes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from nemo_jax._src.search import operators as ops
from nemo_jax._src.search import policies

SETTINGS = settings(max_examples=20, deadline=None)

# One jitted instance of each operator, so hypothesis examples of equal shape reuse it.
sbx_uniforms_jit = jax.jit(ops.sbx_from_uniforms)
pm_uniforms_jit = jax.jit(ops.polynomial_mutation_from_uniforms)
# Probabilities are traced, so every SSNE test with one granularity shares one compile.
mutate_population_jit = jax.jit(ops.ssne_mutate_population, static_argnames="granularity")
crossover_population_jit = jax.jit(ops.ssne_crossover_population,
                                   static_argnames=("mode", "granularity"))
sbx_jit = jax.jit(ops.sbx_crossover)
pm_jit = jax.jit(ops.polynomial_mutation)
tournament_jit = jax.jit(ops.tournament_select, static_argnums=(2, 3))


def _mutate(key, population, granularity="leaf", **probabilities):
  probabilities = {name: jnp.float32(value) for name, value in probabilities.items()}
  return mutate_population_jit(key, population, granularity=granularity, **probabilities)


# --------------------------------------------------------------------------------------
# numpy transcriptions of Deb's NSGA-II reference code (nsga2-gnu, crossover.c/mutation.c)
# --------------------------------------------------------------------------------------


def deb_realcross(parent1, parent2, yl_all, yu_all, eta_c, pcross, u_pair, u_var, u_beta,
                  u_swap, prob_var=0.5, eps=1.0e-14):
  """``realcross`` for one pair, randomperc() calls replaced by the given uniforms."""
  nreal = len(parent1)
  child1, child2 = np.empty(nreal), np.empty(nreal)
  if u_pair <= pcross:
    for i in range(nreal):
      if u_var[i] <= prob_var:
        if abs(parent1[i] - parent2[i]) > eps and yu_all[i] > yl_all[i]:
          if parent1[i] < parent2[i]:
            y1, y2 = parent1[i], parent2[i]
          else:
            y1, y2 = parent2[i], parent1[i]
          yl, yu = yl_all[i], yu_all[i]
          rand = u_beta[i]
          beta = 1.0 + (2.0 * (y1 - yl) / (y2 - y1))
          alpha = 2.0 - beta ** (-(eta_c + 1.0))
          if rand <= (1.0 / alpha):
            betaq = (rand * alpha) ** (1.0 / (eta_c + 1.0))
          else:
            betaq = (1.0 / (2.0 - rand * alpha)) ** (1.0 / (eta_c + 1.0))
          c1 = 0.5 * ((y1 + y2) - betaq * (y2 - y1))
          beta = 1.0 + (2.0 * (yu - y2) / (y2 - y1))
          alpha = 2.0 - beta ** (-(eta_c + 1.0))
          if rand <= (1.0 / alpha):
            betaq = (rand * alpha) ** (1.0 / (eta_c + 1.0))
          else:
            betaq = (1.0 / (2.0 - rand * alpha)) ** (1.0 / (eta_c + 1.0))
          c2 = 0.5 * ((y1 + y2) + betaq * (y2 - y1))
          c1 = min(max(c1, yl), yu)
          c2 = min(max(c2, yl), yu)
          if u_swap[i] <= 0.5:
            child1[i], child2[i] = c2, c1
          else:
            child1[i], child2[i] = c1, c2
        else:
          child1[i], child2[i] = parent1[i], parent2[i]
      else:
        child1[i], child2[i] = parent1[i], parent2[i]
  else:
    child1[:], child2[:] = parent1, parent2
  return child1, child2


def deb_real_mutate(x, yl_all, yu_all, eta_m, pmut, u_mutate, u_delta):
  """``real_mutate_ind`` for one individual, randomperc() replaced by the uniforms."""
  x = np.array(x, np.float64)
  for j in range(len(x)):
    if u_mutate[j] <= pmut and yu_all[j] > yl_all[j]:
      y, yl, yu = x[j], yl_all[j], yu_all[j]
      delta1 = (y - yl) / (yu - yl)
      delta2 = (yu - y) / (yu - yl)
      rnd = u_delta[j]
      mut_pow = 1.0 / (eta_m + 1.0)
      if rnd <= 0.5:
        xy = 1.0 - delta1
        val = 2.0 * rnd + (1.0 - 2.0 * rnd) * (xy ** (eta_m + 1.0))
        deltaq = val ** mut_pow - 1.0
      else:
        xy = 1.0 - delta2
        val = 2.0 * (1.0 - rnd) + 2.0 * (rnd - 0.5) * (xy ** (eta_m + 1.0))
        deltaq = 1.0 - val ** mut_pow
      y = y + deltaq * (yu - yl)
      x[j] = min(max(y, yl), yu)
  return x


def _random_genes(rng, shape, low, high, snap_fraction=0.2):
  """float32 genes in [low, high], some snapped to the bounds, some duplicated."""
  genes = rng.uniform(low, high, size=shape)
  snap = rng.uniform(size=shape)
  genes = np.where(snap < snap_fraction / 2, low, genes)
  genes = np.where(snap > 1 - snap_fraction / 2, high, genes)
  return genes.astype(np.float32)


# --------------------------------------------------------------------------------------
# SBX
# --------------------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 1), pairs=st.sampled_from([1, 5]),
       genes=st.sampled_from([1, 7]),
       eta=st.sampled_from([2.0, 15.0, 30.0]), prob=st.sampled_from([0.9, 1.0]),
       prob_var=st.sampled_from([0.5, 1.0]))
def test_sbx_matches_deb_reference_code(seed, pairs, genes, eta, prob, prob_var):
  rng = np.random.default_rng(seed)
  low = rng.uniform(-3, 2, size=genes).astype(np.float32)
  high = (low + rng.uniform(0.5, 6, size=genes)).astype(np.float32)
  a = _random_genes(rng, (pairs, genes), low, high)
  b = _random_genes(rng, (pairs, genes), low, high)
  b[:, 0] = a[:, 0]  # identical genes must be copied, not crossed
  u_pair = rng.uniform(size=pairs).astype(np.float32)
  u_var, u_beta, u_swap = (rng.uniform(size=(pairs, genes)).astype(np.float32) for _ in range(3))
  got_a, got_b = sbx_uniforms_jit(a, b, low, high, u_pair, u_var, u_beta, u_swap,
                                  eta=eta, prob=prob, prob_var=prob_var)
  for pair in range(pairs):
    want_a, want_b = deb_realcross(
        a[pair].astype(np.float64), b[pair].astype(np.float64), low.astype(np.float64),
        high.astype(np.float64), eta, prob, float(u_pair[pair]), u_var[pair].astype(np.float64),
        u_beta[pair].astype(np.float64), u_swap[pair].astype(np.float64), prob_var=prob_var)
    np.testing.assert_allclose(np.asarray(got_a[pair]), want_a, rtol=1e-5, atol=2e-4)
    np.testing.assert_allclose(np.asarray(got_b[pair]), want_b, rtol=1e-5, atol=2e-4)


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 1), eta=st.floats(0.5, 40.0))
def test_sbx_children_within_bounds_and_symmetric(seed, eta):
  rng = np.random.default_rng(seed)
  low, high = np.float32(2.0), np.float32(8.0)
  a = _random_genes(rng, (16, 12), low, high)
  b = _random_genes(rng, (16, 12), low, high)
  key = jax.random.key(seed)
  child_a, child_b = sbx_jit(key, a, b, low, high, eta=eta)
  for child in (child_a, child_b):
    assert np.all(np.isfinite(child))
    assert np.all((np.asarray(child) >= low) & (np.asarray(child) <= high))
  # Same key, parents swapped: per gene the unordered pair of children is unchanged
  # (the C code only looks at the sorted parents; uncrossed genes copy their parent).
  swapped_a, swapped_b = sbx_jit(key, b, a, low, high, eta=eta)
  np.testing.assert_allclose(np.minimum(child_a, child_b), np.minimum(swapped_a, swapped_b),
                             rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.maximum(child_a, child_b), np.maximum(swapped_a, swapped_b),
                             rtol=0, atol=1e-6)


def test_sbx_preserves_parent_mean_far_from_bounds():
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, size=(64, 10)).astype(np.float32)
  b = (a + rng.uniform(-1, 1, size=a.shape)).astype(np.float32)
  child_a, child_b = sbx_jit(jax.random.key(3), a, b, -1e3, 1e3, prob=1.0,
                                       prob_var=1.0)
  np.testing.assert_allclose(np.asarray(child_a + child_b), a + b, atol=1e-4)
  assert np.mean(np.asarray(child_a) != a) > 0.9  # they really were crossed


def test_sbx_probabilities_zero_copy_parents():
  a = jnp.full((4, 5), 3.0)
  b = jnp.full((4, 5), 6.0)
  child_a, child_b = sbx_jit(jax.random.key(0), a, b, 2.0, 8.0, prob=0.0)
  np.testing.assert_array_equal(child_a, a)
  np.testing.assert_array_equal(child_b, b)


def test_sbx_distribution_matches_pymoo():
  from pymoo.operators.crossover.sbx import cross_sbx
  matings, eta = 4000, 15.0
  low, high = np.array([2.0, 2.0]), np.array([8.0, 8.0])
  parents = np.array([[2.6, 5.0], [3.4, 7.7]])  # gene 0 near the low bound, 1 near high
  pymoo_x = np.stack([np.tile(parents[0], (matings, 1)), np.tile(parents[1], (matings, 1))])
  pymoo_children = cross_sbx(pymoo_x, low, high, np.full((matings, 1), eta),
                             np.full((matings, 1), 1.0), np.full((matings, 1), 0.5),
                             random_state=np.random.default_rng(0))
  ours_a, ours_b = sbx_jit(
      jax.random.key(0), jnp.tile(jnp.asarray(parents[0], jnp.float32), (matings, 1)),
      jnp.tile(jnp.asarray(parents[1], jnp.float32), (matings, 1)), 2.0, 8.0, eta=eta,
      prob=1.0, prob_var=1.0)
  for gene in range(2):
    ours = np.concatenate([np.asarray(ours_a)[:, gene], np.asarray(ours_b)[:, gene]])
    theirs = np.concatenate([pymoo_children[0][:, gene], pymoo_children[1][:, gene]])
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
    # first child marginal too (pymoo assigns by parent position then swaps at random)
    assert stats.ks_2samp(np.asarray(ours_a)[:, gene], pymoo_children[0][:, gene]).pvalue > 1e-3


def test_sbx_is_jit_and_vmap_compatible():
  a = jnp.full((3, 6), 3.0)
  b = jnp.full((3, 6), 5.0)
  keys = jax.random.split(jax.random.key(1), 3)
  batched = jax.jit(jax.vmap(lambda k, x, y: ops.sbx_crossover(k, x, y, 2.0, 8.0)))(
      keys, a[:, None], b[:, None])
  for index in range(3):
    single = sbx_jit(keys[index], a[index:index + 1], b[index:index + 1], 2.0, 8.0)
    np.testing.assert_allclose(batched[0][index], single[0], atol=1e-6)


def test_sbx_bad_input_raises():
  with pytest.raises(ValueError, match="prob"):
    ops.sbx_crossover(jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros((2, 3)), 0, 1, prob=1.5)
  with pytest.raises(ValueError, match="parents_b"):
    ops.sbx_crossover(jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros((2, 4)), 0, 1)


# --------------------------------------------------------------------------------------
# Polynomial mutation
# --------------------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 1), members=st.sampled_from([1, 5]),
       genes=st.sampled_from([1, 7]),
       eta=st.sampled_from([1.0, 20.0, 50.0]), prob=st.sampled_from([None, 0.5, 1.0]))
def test_polynomial_mutation_matches_deb_reference_code(seed, members, genes, eta, prob):
  rng = np.random.default_rng(seed)
  low = rng.uniform(-3, 2, size=genes).astype(np.float32)
  high = (low + rng.uniform(0.5, 6, size=genes)).astype(np.float32)
  x = _random_genes(rng, (members, genes), low, high)
  u_mutate, u_delta = (rng.uniform(size=(members, genes)).astype(np.float32) for _ in range(2))
  got = pm_uniforms_jit(x, low, high, u_mutate, u_delta, eta=eta, prob=prob)
  pmut = 1.0 / genes if prob is None else prob
  for member in range(members):
    want = deb_real_mutate(x[member], low.astype(np.float64), high.astype(np.float64), eta,
                           pmut, u_mutate[member], u_delta[member].astype(np.float64))
    np.testing.assert_allclose(np.asarray(got[member]), want, rtol=1e-5, atol=2e-4)


@SETTINGS
@given(seed=st.integers(0, 2 ** 31 - 1), eta=st.floats(0.0, 60.0))
def test_polynomial_mutation_within_bounds(seed, eta):
  rng = np.random.default_rng(seed)
  x = _random_genes(rng, (8, 10), 2.0, 8.0, snap_fraction=0.5)
  mutated = np.asarray(pm_jit(jax.random.key(seed), x, 2.0, 8.0, eta=eta,
                                               prob=1.0))
  assert np.all(np.isfinite(mutated))
  assert np.all((mutated >= 2.0) & (mutated <= 8.0))


def test_polynomial_mutation_default_rate_is_one_over_genes():
  x = jnp.full((2000, 20), 5.0)
  mutated = pm_jit(jax.random.key(0), x, 2.0, 8.0)
  rate = float(jnp.mean(mutated != x))
  assert abs(rate - 1 / 20) < 0.005  # binomial sd ~0.0011


def test_polynomial_mutation_distribution_matches_pymoo():
  from pymoo.operators.mutation.pm import mut_pm
  samples, eta = 4000, 20.0
  low, high = np.array([2.0, 2.0]), np.array([8.0, 8.0])
  start = np.array([2.3, 6.0])
  theirs = mut_pm(np.tile(start, (samples, 1)), low, high, np.full(samples, eta),
                  np.full(samples, 1.0), False, random_state=np.random.default_rng(0))
  ours = np.asarray(pm_jit(
      jax.random.key(0), jnp.tile(jnp.asarray(start, jnp.float32), (samples, 1)), 2.0, 8.0,
      eta=eta, prob=1.0))
  for gene in range(2):
    assert stats.ks_2samp(ours[:, gene], theirs[:, gene]).pvalue > 1e-3


# --------------------------------------------------------------------------------------
# Decoders
# --------------------------------------------------------------------------------------


def test_decode_round_and_floor_hand_computed():
  genes = jnp.array([2.0, 2.49, 2.5, 3.7, 7.49, 7.5, 7.99, 8.0, 1.2, 9.3])
  np.testing.assert_array_equal(ops.decode_round(genes), [2, 2, 3, 4, 7, 8, 8, 8, 2, 8])
  np.testing.assert_array_equal(ops.decode_floor(genes), [2, 2, 2, 3, 7, 7, 7, 8, 2, 8])
  np.testing.assert_array_equal(ops.decode_floor(genes, 1, 4), [2, 2, 2, 3, 4, 4, 4, 4, 1, 4])
  assert ops.decode_round(genes).dtype == jnp.int32
  with pytest.raises(ValueError, match="choices_low"):
    ops.decode_round(genes, 8, 2)


@SETTINGS
@given(values=st.lists(st.floats(2.0, 8.0, width=32), min_size=1, max_size=20))
def test_decoders_match_python_rounding(values):
  genes = np.array(values, np.float32)
  want_round = [min(8, max(2, math.floor(float(v) + 0.5))) for v in genes]
  want_floor = [min(8, max(2, math.floor(float(v)))) for v in genes]
  np.testing.assert_array_equal(ops.decode_round(genes), want_round)
  np.testing.assert_array_equal(ops.decode_floor(genes), want_floor)


# --------------------------------------------------------------------------------------
# SSNE operators
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def population():
  policy = policies.gcn_policy(hidden=8, n_choices=7, heads=2)
  keys = jax.random.split(jax.random.key(0), 8)
  params = jax.vmap(policy.init, in_axes=(0, None))(keys, 5)
  # Non-zero biases so that proportional noise can move every tensor.
  return jax.tree_util.tree_map(lambda leaf: leaf + 0.1, params)


def _changed_leaves(before, after, member):
  return [index for index, (x, y) in enumerate(zip(jax.tree_util.tree_leaves(before),
                                                  jax.tree_util.tree_leaves(after)))
          if not np.array_equal(np.asarray(x[member]), np.asarray(y[member]))]


@pytest.mark.parametrize("granularity", ["leaf", "layer"])
def test_ssne_mutate_changes_at_most_one_layer(population, granularity):
  unit_of_leaf, _ = ops.layer_ids(population, granularity)
  members_changed = 0
  for seed in range(3):
    mutated = _mutate(jax.random.key(seed), population, granularity, mut_prob=0.9,
                      mut_frac=0.5)
    assert (jax.tree_util.tree_structure(mutated) == jax.tree_util.tree_structure(population))
    for before, after in zip(jax.tree_util.tree_leaves(population),
                             jax.tree_util.tree_leaves(mutated)):
      assert before.shape == after.shape and before.dtype == after.dtype
      assert np.all(np.isfinite(after))
    for member in range(8):
      changed_units = {unit_of_leaf[i] for i in _changed_leaves(population, mutated, member)}
      assert len(changed_units) <= 1
      members_changed += bool(changed_units)
  assert members_changed > 0.6 * 24  # mut_prob 0.9 (a chosen tiny tensor may stay equal)


def test_ssne_mutate_noise_is_proportional_and_mut_prob_zero_is_identity(population):
  same = _mutate(jax.random.key(1), population, mut_prob=0.0)
  for x, y in zip(jax.tree_util.tree_leaves(population), jax.tree_util.tree_leaves(same)):
    np.testing.assert_array_equal(x, y)
  # Regular mutation only: relative changes are N(0, 0.1^2).
  mutated = _mutate(jax.random.key(2), population, mut_prob=1.0, mut_frac=1.0,
                    super_mut_prob=0.0, reset_prob=0.0)
  ratios = []
  for x, y in zip(jax.tree_util.tree_leaves(population), jax.tree_util.tree_leaves(mutated)):
    x, y = np.asarray(x), np.asarray(y)
    moved = x != y
    ratios.extend(np.abs((y[moved] - x[moved]) / x[moved]))
  ratios = np.array(ratios)
  assert ratios.size > 50
  # |N(0, 0.1^2)|: mean 0.1 * sqrt(2 / pi) ~= 0.0798
  assert abs(ratios.mean() - 0.1 * math.sqrt(2 / math.pi)) < 0.015


def test_ssne_mutate_reset_draws_standard_normal(population):
  mutated = _mutate(jax.random.key(3), population, mut_prob=1.0, mut_frac=1.0,
                    super_mut_prob=0.0, reset_prob=1.0)
  values = []
  for x, y in zip(jax.tree_util.tree_leaves(population), jax.tree_util.tree_leaves(mutated)):
    values.extend(np.asarray(y)[np.asarray(x) != np.asarray(y)].ravel())
  assert len(values) > 100
  assert stats.kstest(values, "norm").pvalue > 1e-3


@pytest.mark.parametrize("granularity", ["leaf", "layer"])
def test_ssne_crossover_swap_takes_each_layer_from_one_parent(population, granularity):
  unit_of_leaf, num_units = ops.layer_ids(population, granularity)
  pop_a = population
  pop_b = jax.tree_util.tree_map(lambda leaf: -leaf - 1.0, population)
  child_a, child_b = crossover_population_jit(jax.random.key(4), pop_a, pop_b,
                                              granularity=granularity)
  sources_seen = set()
  for member in range(8):
    source_of_unit = {}
    for index, (a, b, ca, cb) in enumerate(zip(*(jax.tree_util.tree_leaves(tree) for tree in
                                                  (pop_a, pop_b, child_a, child_b)))):
      a, b, ca, cb = (np.asarray(t[member]) for t in (a, b, ca, cb))
      if np.array_equal(ca, a):
        source, expected_b = "a", b
      elif np.array_equal(ca, b):
        source, expected_b = "b", a
      else:
        raise AssertionError(f"leaf {index} of child_a comes from neither parent")
      np.testing.assert_array_equal(cb, expected_b)  # complementary children
      # All tensors of one unit come from the same parent.
      assert source_of_unit.setdefault(unit_of_leaf[index], source) == source
    sources_seen.update(source_of_unit.values())
  assert sources_seen == {"a", "b"}
  assert num_units >= 3


def test_ssne_crossover_average(population):
  pop_b = jax.tree_util.tree_map(lambda leaf: leaf + 2.0, population)
  child_a, child_b = crossover_population_jit(jax.random.key(2), population, pop_b,
                                                   mode="average", swap_prob=1.0)
  for a, b, ca, cb in zip(*(jax.tree_util.tree_leaves(t) for t in
                            (population, pop_b, child_a, child_b))):
    np.testing.assert_allclose(ca, (a + b) / 2, atol=1e-6)
    np.testing.assert_allclose(cb, (a + b) / 2, atol=1e-6)
  with pytest.raises(ValueError, match="mode"):
    ops.ssne_crossover(jax.random.key(0), {"w": jnp.ones(2)}, {"w": jnp.ones(2)}, mode="mix")


def test_ssne_bad_input_raises():
  with pytest.raises(ValueError, match="granularity"):
    ops.ssne_mutate(jax.random.key(0), {"w": jnp.ones(2)}, granularity="neuron")
  with pytest.raises(ValueError, match="mut_prob"):
    ops.ssne_mutate(jax.random.key(0), {"w": jnp.ones(2)}, mut_prob=-0.1)


# --------------------------------------------------------------------------------------
# Tournament selection
# --------------------------------------------------------------------------------------


def test_binary_tournament_frequencies_match_closed_form():
  size, draws = 6, 60000
  ranks = jnp.array([3, 0, 5, 1, 4, 2])  # member i has rank ranks[i]; lower is better
  winners = np.asarray(tournament_jit(jax.random.key(0), ranks, draws, 2))
  frequencies = np.bincount(winners, minlength=size) / draws
  # With replacement, P(winner has rank r) = ((P - r)^2 - (P - r - 1)^2) / P^2.
  expected = np.array([((size - r) ** 2 - (size - r - 1) ** 2) / size ** 2
                       for r in np.asarray(ranks)])
  np.testing.assert_allclose(frequencies, expected, atol=0.01)


def test_tournament_respects_valid_mask_and_tie_break():
  ranks = jnp.array([0, 0, 1, 0])
  valid = jnp.array([True, False, True, True])
  winners = np.asarray(tournament_jit(jax.random.key(1), ranks, 500, 3, valid=valid))
  assert not np.any(winners == 1)
  tie_break = jnp.array([0.0, -5.0, 0.0, -1.0])  # member 1 best among rank 0 ...
  winners = np.asarray(tournament_jit(jax.random.key(2), ranks, 2000, 8,
                                             tie_break=tie_break))
  assert np.mean(winners == 1) > 0.85  # ... and with 8 of 4 drawn it is nearly always drawn
  assert not np.any(winners == 2)  # rank 1 never wins against rank 0 contestants
  with pytest.raises(ValueError, match="tournament_size"):
    ops.tournament_select(jax.random.key(0), ranks, 3, 0)
