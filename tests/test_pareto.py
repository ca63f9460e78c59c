"""Tests of the Pareto toolkit against brute-force numpy references, pymoo and moocore.

Everything is minimised. Inputs are padded to a few fixed sizes (with the padding marked
invalid) so hypothesis examples reuse compiled functions.
"""

from __future__ import annotations

import math

import jax
import moocore
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymoo.algorithms.moo.nsga3 import ReferenceDirectionSurvival
from pymoo.core.population import Population
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
from pymoo.util.ref_dirs import get_reference_directions

from nemo_jax import pareto

PAD = 160  # every hypothesis example is padded to this many rows
SETTINGS = dict(deadline=None, max_examples=20, derandomize=True)

rank_jit = jax.jit(pareto.nondominated_rank)
rank_blocked_jit = jax.jit(lambda F, v: pareto.nondominated_rank(F, v, block_size=48))
mask_jit = jax.jit(pareto.nondominated_mask)
mask_blocked_jit = jax.jit(lambda F, v: pareto.nondominated_mask(F, v, block_size=48))
crowding_jit = jax.jit(pareto.crowding_distance)
constrained_jit = jax.jit(pareto.constrained_rank)
nsga2_jit = jax.jit(pareto.nsga2_select, static_argnums=1)
nsga3_jit = jax.jit(pareto.nsga3_select, static_argnums=1)
nsga2_priority_jit = jax.jit(pareto.nsga2_priority)
nsga3_priority_jit = jax.jit(pareto.nsga3_priority)  # k is traced: one compile per shape
hypervolume_jit = jax.jit(pareto.hypervolume)


# ----------------------------------------------------------------------------- references


def dominance_matrix(F, ok):
  """dom[i, j]: valid row i Pareto-dominates row j (O(N^2 M) brute force)."""
  F = np.where(ok[:, None], F, 0)
  le = np.all(F[:, None, :] <= F[None, :, :], axis=-1)
  lt = np.any(F[:, None, :] < F[None, :, :], axis=-1)
  return le & lt & ok[:, None] & ok[None, :]


def peel(dom, ok):
  """Front-by-front peeling of a dominance relation; invalid rows get max + 1."""
  rank = np.zeros(len(ok), np.int64)
  remaining = ok.copy()
  r = 0
  while remaining.any():
    front = remaining & ~dom[remaining].any(axis=0)
    rank[front] = r
    remaining &= ~front
    r += 1
  rank[~ok] = r
  return rank


def brute_rank(F, ok):
  return peel(dominance_matrix(F, ok), ok)


def constrained_dominance(F, violation, ok):
  """Deb's constraint domination: feasible beats infeasible, then smaller violation."""
  feasible = violation <= 0
  dom = dominance_matrix(F, ok)
  dom = (dom & feasible[:, None] & feasible[None, :]) | (
      feasible[:, None] & ~feasible[None, :]) | (
          ~feasible[:, None] & ~feasible[None, :] & (violation[:, None] < violation[None, :]))
  return dom & ok[:, None] & ok[None, :]


def brute_selection_rank(F, ok, violation=None):
  if violation is None:
    return brute_rank(F, ok)
  return peel(constrained_dominance(F, violation, ok), ok)


def inverse_permutation(order):
  priority = np.empty(len(order), np.int64)
  priority[np.asarray(order, np.int64)] = np.arange(len(order))
  return priority


def brute_crowding(F, rank, ok):
  """Deb's crowding distance, one front and objective at a time; ties by row index."""
  n, m = F.shape
  distance = np.zeros(n)
  for r in np.unique(rank[ok]):
    members = np.flatnonzero(ok & (rank == r))
    for j in range(m):
      order = members[np.lexsort((members, F[members, j]))]
      f = F[order, j]
      distance[order[0]] = distance[order[-1]] = np.inf
      span = f[-1] - f[0]
      for p in range(1, len(order) - 1):
        if span > 0:
          distance[order[p]] += (f[p + 1] - f[p - 1]) / span
  return distance


def random_objectives(seed, n, m, tie_levels, nan_fraction, invalid_fraction):
  """Rows padded to PAD; ties/duplicates when tie_levels is small."""
  rng = np.random.default_rng(seed)
  if tie_levels:
    F = rng.integers(0, tie_levels, size=(PAD, m)).astype(np.float32)
  else:
    F = rng.random((PAD, m)).astype(np.float32)
  if n > 4:  # force exact duplicates of earlier rows
    F[n - 2:n] = F[:2]
  F[rng.random(PAD) < nan_fraction, rng.integers(0, m)] = np.nan
  valid = (np.arange(PAD) < n) & (rng.random(PAD) >= invalid_fraction)
  ok = valid & ~np.isnan(F).any(axis=1)
  return F, valid, ok


objective_sets = st.tuples(
    st.integers(0, 2**31 - 1), st.integers(1, PAD), st.integers(2, 4),
    st.sampled_from([0, 2, 3, 5]), st.sampled_from([0.0, 0.1]), st.sampled_from([0.0, 0.2]))


# ----------------------------------------------------------------------------- ranking


@settings(**SETTINGS)
@given(objective_sets)
def test_rank_equals_brute_force(case):
  F, valid, ok = random_objectives(*case)
  expected = brute_rank(F, ok)
  np.testing.assert_array_equal(np.asarray(rank_jit(F, valid)), expected)
  np.testing.assert_array_equal(np.asarray(rank_blocked_jit(F, valid)), expected)
  first = expected == 0
  first &= ok
  np.testing.assert_array_equal(np.asarray(mask_jit(F, valid)), first)
  np.testing.assert_array_equal(np.asarray(mask_blocked_jit(F, valid)), first)


@pytest.mark.parametrize("n,m,levels", [(300, 2, 0), (300, 3, 0), (257, 3, 4), (200, 4, 3),
                                        (150, 2, 6)])
def test_rank_equals_pymoo_and_moocore(n, m, levels):
  rng = np.random.default_rng(n + m)
  F = (rng.integers(0, levels, (n, m)) if levels else rng.random((n, m))).astype(np.float64)
  _, pymoo_rank = NonDominatedSorting().do(F, return_rank=True)
  ours = np.asarray(rank_jit(F))
  np.testing.assert_array_equal(ours, pymoo_rank)
  np.testing.assert_array_equal(ours, moocore.pareto_rank(F))


def test_blocked_path_many_blocks_matches_moocore():
  rng = np.random.default_rng(7)
  F = rng.random((3000, 3)).astype(np.float32)
  F[::7, 0] = np.round(F[::7, 0], 1)  # ties in the sort key across blocks
  ours = np.asarray(jax.jit(lambda x: pareto.nondominated_rank(x, block_size=256))(F))
  np.testing.assert_array_equal(ours, moocore.pareto_rank(F.astype(np.float64)))
  F2 = rng.random((5000, 2)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(rank_jit(F2)),
                                moocore.pareto_rank(F2.astype(np.float64)))


def test_invalid_rows_never_dominate_and_rank_last():
  F = np.array([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0], [np.nan, 0.0], [3.0, 0.5]])
  valid = np.array([True, True, False, True, True])
  rank = np.asarray(rank_jit(F, valid))
  # Row 2 would dominate everything and row 3 has a NaN: both ignored, ranked last.
  np.testing.assert_array_equal(rank, [0, 1, 2, 2, 0])
  np.testing.assert_array_equal(np.asarray(mask_jit(F, valid)),
                                [True, False, False, False, True])
  assert np.asarray(rank_jit(np.full((3, 2), np.nan))).tolist() == [0, 0, 0]
  # Infinite objective values are valid (only NaN invalidates a row).
  G = np.array([[0.0, np.inf], [1.0, np.inf], [np.inf, 0.0], [np.inf, np.inf]])
  for extra in (0, 1):
    H = np.concatenate([G, np.zeros((4, extra))], axis=1)
    np.testing.assert_array_equal(np.asarray(rank_jit(H)), [0, 1, 0, 2])
    np.testing.assert_array_equal(np.asarray(mask_jit(H)), [True, False, True, False])


def test_duplicates_share_a_front():
  F = np.array([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0], [2.0, 2.0], [2.0, 2.0], [1.0, 2.0]])
  for m_extra in (0, 1):  # M = 2 (scan) and M = 3 (bit peeling)
    G = np.concatenate([F, np.zeros((len(F), m_extra))], axis=1)
    np.testing.assert_array_equal(np.asarray(rank_jit(G)),
                                  [0, 0, 0, 1, 1, 0])


@settings(**SETTINGS)
@given(objective_sets, st.sampled_from([0, 3]))
def test_constrained_rank_equals_brute_force(case, violation_levels):
  F, valid, ok = random_objectives(*case)
  rng = np.random.default_rng(case[0] + 1)
  if violation_levels:
    violation = rng.integers(0, violation_levels, PAD).astype(np.float32) * 0.5
  else:
    violation = np.where(rng.random(PAD) < 0.5, 0.0, rng.random(PAD)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(constrained_jit(F, violation, valid)),
                                peel(constrained_dominance(F, violation, ok), ok))


def test_constrained_rank_per_constraint_values():
  F = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.5, 0.5]])
  g = np.array([[0.2, -1.0], [-1.0, -1.0], [-1.0, -2.0], [0.1, 0.1]])  # g <= 0 feasible
  # Feasible rows 1 and 2 form fronts by Pareto; then violations 0.2 (row 0), 0.2 (row 3).
  np.testing.assert_array_equal(np.asarray(constrained_jit(F, g)), [1, 0, 0, 1])


# ----------------------------------------------------------------------------- crowding


@settings(**SETTINGS)
@given(objective_sets)
def test_crowding_equals_numpy_reference(case):
  F, valid, ok = random_objectives(*case)
  rank = brute_rank(F, ok)
  ours = np.asarray(crowding_jit(F, None, valid))
  expected = brute_crowding(F.astype(np.float64), rank, ok)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- selection


def nsga2_reference(F, k, ok):
  rank = brute_rank(F, ok)
  crowd = brute_crowding(F.astype(np.float64), rank, ok)
  return np.lexsort((np.arange(len(F)), -crowd, rank))[:k]


@settings(**SETTINGS)
@given(objective_sets)
def test_nsga2_select_front_by_front(case):
  F, valid, ok = random_objectives(*case)
  k = 80
  chosen = np.asarray(nsga2_jit(F, k, valid))
  assert chosen.shape == (k,) and chosen.dtype == np.int32
  assert len(set(chosen.tolist())) == k
  np.testing.assert_array_equal(chosen, nsga2_reference(F, k, ok))
  rank = brute_rank(F, ok)
  if k:
    worst = rank[chosen].max()
    assert np.all(np.isin(np.flatnonzero(rank < worst), chosen))  # whole earlier fronts
    assert ok[chosen].sum() == min(k, ok.sum())  # valid rows first


def asf_normalise_reference(F, considered, first_front):
  """pymoo's get_nadir_point logic (Deb & Jain normalisation), numpy float64."""
  m = F.shape[1]
  ideal = F[considered].min(axis=0)
  translated = F - ideal
  worst = translated[considered].max(axis=0)
  worst_front = translated[first_front].max(axis=0)
  weights = np.where(np.eye(m, dtype=bool), 1.0, 1e-6)
  asf = np.max(translated[None, :, :] / weights[:, None, :], axis=-1)
  asf[:, ~considered] = np.inf
  E = translated[np.argmin(asf, axis=1)]
  try:
    if len(np.unique(E, axis=0)) < m:  # one point extreme for two axes: no hyperplane
      raise np.linalg.LinAlgError
    plane = np.linalg.solve(E, np.ones(m))
    intercepts = 1 / plane
    if not np.allclose(E @ plane, 1) or np.any(intercepts <= 1e-6):
      raise np.linalg.LinAlgError
    span = np.minimum(intercepts, worst)
  except np.linalg.LinAlgError:
    span = worst_front
  span = np.where(span <= 1e-6, worst, span)
  span = np.where(span <= 1e-6, 1, span)
  return translated / span


def nsga3_reference(F, k, dirs, ok):
  """Loop-based NSGA-III survival with the same deterministic tie rules."""
  n = len(F)
  rank = brute_rank(F, ok)
  index = np.arange(n)
  if ok.sum() <= k:
    return np.lexsort((index, rank))[:k]
  counts = np.cumsum(np.bincount(rank[ok], minlength=n + 1))
  last = int(np.argmax(counts >= k))
  taken = ok & (rank < last)
  candidates = ok & (rank == last)
  normalised = asf_normalise_reference(np.where(ok[:, None], F, 0), ok & (rank <= last),
                                       ok & (rank == 0))
  unit = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
  along = normalised @ unit.T
  distance = np.linalg.norm(normalised[:, None, :] - along[:, :, None] * unit[None], axis=-1)
  niche, niche_distance = distance.argmin(axis=1), distance.min(axis=1)
  niche_count = np.bincount(niche[taken], minlength=len(dirs))
  picks = []
  available = candidates.copy()
  for _ in range(k - taken.sum()):
    has = np.array([np.any(available & (niche == j)) for j in range(len(dirs))])
    j = int(np.argmin(np.where(has, niche_count, np.iinfo(np.int64).max)))
    members = np.flatnonzero(available & (niche == j))
    i = members[np.argmin(niche_distance[members])]
    picks.append(i)
    available[i] = False
    niche_count[j] += 1
  first = index[taken][np.lexsort((index[taken], rank[taken]))]
  return np.concatenate([first, np.array(picks, np.int64)])


@pytest.mark.parametrize("n,m,k,partitions,seed", [(100, 3, 50, 6, 0), (120, 2, 37, 12, 1),
                                                   (90, 4, 45, 4, 2), (60, 3, 60, 5, 3),
                                                   (80, 3, 10, 3, 4)])
def test_nsga3_select_equals_loop_reference(n, m, k, partitions, seed):
  rng = np.random.default_rng(seed)
  F = rng.random((n, m)) ** 2
  F[:, 0] *= 10  # different scales: normalisation matters
  valid = rng.random(n) > 0.1
  dirs = np.asarray(pareto.uniform_weights(m, partitions))
  with jax.enable_x64(True):
    ours = np.asarray(nsga3_jit(F, k, dirs, valid))
  np.testing.assert_array_equal(ours, nsga3_reference(F, k, dirs, valid))


@settings(**SETTINGS)
@given(objective_sets)
def test_nsga3_select_front_by_front(case):
  F, valid, ok = random_objectives(*case)
  dirs = pareto.uniform_weights(F.shape[1], 4)
  k = 80
  keys = [None] + ([jax.random.key(case[0])] if F.shape[1] == 3 else [])  # random ties
  for key in keys:
    chosen = np.asarray(nsga3_jit(F, k, dirs, valid, key=key))
    assert chosen.shape == (k,) and len(set(chosen.tolist())) == k
    rank = brute_rank(F, ok)
    worst = rank[chosen].max()
    assert np.all(np.isin(np.flatnonzero(rank < worst), chosen))
    assert ok[chosen].sum() == min(k, ok.sum())


def test_nsga3_prefers_empty_niches():
  # Front 0 = rows 0-2 (extremes (0, 1), (1, 0), so normalisation is the identity); rows
  # 1 and 2 occupy the (1, 0) niche. Front 1 offers row 3 (also the (1, 0) niche) and
  # row 4 (the empty (0.5, 0.5) niche): niching must take row 4 despite its index.
  F = np.array([[0.0, 1.0], [1.0, 0.0], [0.8, 0.1], [1.0, 0.05], [0.9, 0.9]])
  dirs = pareto.uniform_weights(2, 4)
  np.testing.assert_array_equal(np.asarray(nsga3_jit(F, 4, dirs)), [0, 1, 2, 4])
  np.testing.assert_array_equal(nsga3_reference(F, 4, np.asarray(dirs), np.ones(5, bool)),
                                [0, 1, 2, 4])


# ----------------------------------------------------------------------------- priorities


def nsga2_priority_reference(F, ok, violation=None):
  """Rank (constrained when violation is given), descending crowding, index."""
  rank = brute_selection_rank(F, ok, violation)
  crowd = brute_crowding(F.astype(np.float64), rank, ok)
  return inverse_permutation(np.lexsort((np.arange(len(F)), -crowd, rank)))


def nsga3_priority_reference(F, k, dirs, ok, violation=None):
  """Loop-based NSGA-III total order: niching front after front, counts over all ordered.

  Normalised on the fronts up to the one reaching k valid rows; in each front the
  direction with the smallest niche count among those with candidates (lowest index),
  then its nearest member (lowest index); invalid rows last by index.
  """
  n = len(F)
  if not ok.any():
    return np.arange(n)
  rank = brute_selection_rank(F, ok, violation)
  counts = np.cumsum(np.bincount(rank[ok], minlength=n + 1))
  last = int(np.argmax(counts >= k)) if ok.sum() >= k else n + 1
  normalised = asf_normalise_reference(np.where(ok[:, None], F, 0), ok & (rank <= last),
                                       ok & (rank == 0))
  unit = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
  along = normalised @ unit.T
  distance = np.sqrt(np.maximum(np.sum(normalised ** 2, axis=1, keepdims=True) - along ** 2,
                                0))
  niche, niche_distance = distance.argmin(axis=1), distance.min(axis=1)
  niche_count = np.zeros(len(dirs), np.int64)
  order = []
  for r in np.unique(rank[ok]):
    available = ok & (rank == r)
    while available.any():
      has = np.bincount(niche[available], minlength=len(dirs)) > 0
      j = int(np.argmin(np.where(has, niche_count, np.iinfo(np.int64).max)))
      members = np.flatnonzero(available & (niche == j))
      i = members[np.argmin(niche_distance[members])]
      order.append(i)
      available[i] = False
      niche_count[j] += 1
  return inverse_permutation(order + np.flatnonzero(~ok).tolist())


@pytest.mark.parametrize("n,m,k,partitions,seed,constrained",
                         [(100, 3, 50, 6, 0, False), (120, 2, 37, 12, 1, False),
                          (90, 4, 45, 4, 2, False), (60, 3, 60, 5, 3, True),
                          (80, 3, 10, 3, 4, True), (70, 2, 0, 8, 5, True)])
def test_nsga3_priority_equals_loop_reference(n, m, k, partitions, seed, constrained):
  rng = np.random.default_rng(seed)
  F = rng.random((n, m)) ** 2
  F[:, 0] *= 10  # different scales: normalisation matters
  valid = rng.random(n) > 0.1
  violation = (np.where(rng.random(n) < 0.7, 0.0, rng.random(n)) if constrained else None)
  dirs = np.asarray(pareto.uniform_weights(m, partitions), np.float64)
  with jax.enable_x64(True):
    ours = np.asarray(nsga3_priority_jit(F, k, dirs, valid, violation))
  expected = nsga3_priority_reference(F, k, dirs, valid, violation)
  np.testing.assert_array_equal(ours, expected)
  # The k best are NSGA-III's survivors: the reference survival loop agrees.
  if not constrained:
    np.testing.assert_array_equal(np.sort(np.flatnonzero(ours < k)),
                                  np.sort(nsga3_reference(F, k, dirs, valid)))


def pymoo_survivor_sets(F, k, dirs, seeds=6):
  """pymoo's NSGA-III survivor sets over several random states (it breaks ties randomly)."""
  out = set()
  for seed in range(seeds):
    pop = Population.new("F", F, "index", np.arange(len(F)))
    survivors = ReferenceDirectionSurvival(dirs)._do(None, pop, n_survive=k,
                                                     random_state=np.random.default_rng(seed))
    out.add(frozenset(int(i) for i in survivors.get("index")))
  return out


@pytest.mark.parametrize("m,partitions", [(2, 30), (3, 12)])
def test_nsga3_priority_survivors_equal_pymoo(m, partitions):
  # pymoo draws random niche/member ties; only cases where its survivor set does not
  # depend on the random state (no effective tie) are compared. pymoo is given the
  # fronts up to the last one (its worst point is taken over the whole population,
  # ours over those fronts); objectives are scaled far above its 1e-3 snapping.
  dirs = np.array(pareto.uniform_weights(m, partitions), np.float64)
  compared = 0
  for seed in range(12):
    rng = np.random.default_rng(100 + seed)
    n = 60
    F = rng.random((n, m)) * rng.uniform(1.0, 1000.0, m)
    rank = brute_rank(F, np.ones(n, bool))
    for k in (10, 25, 40):
      considered = np.flatnonzero(rank <= np.argmax(np.cumsum(np.bincount(rank)) >= k))
      sets = pymoo_survivor_sets(F[considered], k, dirs)
      if len(sets) != 1:
        continue
      compared += 1
      # Invalid padding rows (they would dominate everything) must not change anything.
      padded = np.concatenate([F, np.full((4, m), -1.0)])
      valid = np.arange(n + 4) < n
      with jax.enable_x64(True):
        ours = np.asarray(nsga3_priority_jit(padded, k, dirs, valid))
      assert set(np.flatnonzero(ours < k).tolist()) == set(considered[list(sets.pop())])
      assert set(ours[n:].tolist()) == set(range(n, n + 4))    # invalid rows last
  assert compared >= 4  # the test has teeth


@settings(**{**SETTINGS, "max_examples": 12})
@given(objective_sets, st.booleans())
def test_nsga3_priority_is_a_permutation_consistent_with_survival_for_every_k(case, constrained):
  F, valid, ok = random_objectives(*case)
  F = F.astype(np.float64)
  n, m = F.shape
  dirs = np.asarray(pareto.uniform_weights(m, 4), np.float64)
  # On integer levels, different points are often exactly as far from a reference line;
  # which comes first is then decided by last-bit rounding (operation order), so the
  # order is compared with the loop reference only on continuous values.
  exact = case[3] == 0
  rng = np.random.default_rng(case[0] + 2)
  violation = (np.where(rng.random(n) < 0.6, 0.0, np.round(rng.random(n), 1))
               if constrained else None)
  ks = np.arange(n + 1)
  with jax.enable_x64(True):
    every_k = jax.jit(jax.vmap(pareto.nsga3_priority, in_axes=(None, 0, None, None, None)))
    priorities = np.asarray(every_k(F, ks, dirs, valid, violation))
    selected = {k: np.asarray(nsga3_jit(F, k, dirs, valid, violation)) for k in (1, 37, 80)}
  rank = brute_selection_rank(F, ok, violation)
  counts = np.cumsum(np.bincount(rank[ok], minlength=n + 1))
  references = {}
  for k in ks:
    priority = priorities[k]
    np.testing.assert_array_equal(np.sort(priority), np.arange(n))   # a permutation
    last = int(np.argmax(counts >= k)) if ok.sum() >= k else n + 1
    if exact:
      if last not in references:  # the order depends on k only through the last front
        references[last] = nsga3_priority_reference(F, k, dirs, ok, violation)
      np.testing.assert_array_equal(priority, references[last])
    chosen = priority < k
    assert np.all(chosen[ok & (rank < last)])                  # whole earlier fronts
    assert chosen[ok].sum() == min(k, ok.sum())                # valid rows first
    if k in selected:
      assert set(np.flatnonzero(chosen).tolist()) == set(selected[k].tolist())


@settings(**SETTINGS)
@given(objective_sets, st.booleans())
def test_nsga2_priority_equals_rank_then_crowding(case, constrained):
  F, valid, ok = random_objectives(*case)
  rng = np.random.default_rng(case[0] + 3)
  violation = (np.where(rng.random(len(F)) < 0.6, 0.0, np.round(rng.random(len(F)), 1))
               .astype(np.float32) if constrained else None)
  ours = np.asarray(nsga2_priority_jit(F, valid, violation))
  np.testing.assert_array_equal(ours, nsga2_priority_reference(F, ok, violation))
  np.testing.assert_array_equal(np.asarray(nsga2_jit(F, 80, valid, violation)),
                                np.argsort(ours)[:80])


def test_priorities_apply_constraint_domination():
  # Row 0 dominates everything but violates a constraint; rows 3 and 4 violate less and
  # more; row 5 has a NaN violation (invalid). Feasible rows 1, 2 (one front) come
  # first, then row 3 (0.1), row 0 (0.5), row 4 (2.0), then the invalid row.
  F = np.array([[0.0, 0.0], [1.0, 3.0], [3.0, 1.0], [0.5, 0.5], [0.2, 0.2], [0.0, 0.0]])
  violation = np.array([0.5, 0.0, 0.0, 0.1, 2.0, np.nan])
  dirs = pareto.uniform_weights(2, 4)
  for priority in (nsga2_priority_jit(F, None, violation),
                   nsga3_priority_jit(F, 2, dirs, None, violation)):
    assert np.argsort(np.asarray(priority)).tolist()[2:] == [3, 0, 4, 5]
    assert set(np.argsort(np.asarray(priority))[:2].tolist()) == {1, 2}
  # Per-constraint values g <= 0 are summed as sum(max(g, 0)); all-feasible equals none.
  g = np.stack([violation, np.zeros(6)], axis=1) - np.array([[0.0, 1.0]])
  np.testing.assert_array_equal(np.asarray(nsga3_priority_jit(F, 3, dirs, None, g)),
                                np.asarray(nsga3_priority_jit(F, 3, dirs, None, violation)))
  np.testing.assert_array_equal(np.asarray(nsga3_priority_jit(F, 3, dirs, None, np.zeros(6))),
                                np.asarray(nsga3_priority_jit(F, 3, dirs)))
  # Without constraints row 0 is the single best.
  assert int(np.argmin(np.asarray(nsga2_priority_jit(F, None, None)))) == 0


def test_nsga3_priority_continues_niching_beyond_the_survivors():
  # Front 0 = rows 0-3 (extremes (0, 1) and (1, 0): normalisation is the identity), rows
  # 2 and 3 in the middle niche; rows 4 and 5 are fronts 1 and 2.
  F = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.52, 0.48], [0.9, 0.9], [1.0, 1.0]])
  dirs = pareto.uniform_weights(2, 2)  # (1, 0), (0.5, 0.5), (0, 1)
  priority = np.asarray(nsga3_priority_jit(F, 2, dirs))
  # All niches empty: the lowest directions (1, 0) and (0.5, 0.5) give the survivors.
  assert set(np.flatnonzero(priority < 2).tolist()) == {1, 2}
  # Then the empty (0, 1) niche (row 0) before row 3, whose niche already holds row 2;
  # only then the later fronts. (A per-niche round order would put row 0 first.)
  np.testing.assert_array_equal(np.argsort(priority), [1, 2, 0, 3, 4, 5])
  with pytest.raises(ValueError, match="k must"):
    pareto.nsga3_priority(F, 7, dirs)


# ----------------------------------------------------------------------------- hypervolume


@settings(**SETTINGS)
@given(st.integers(0, 2**31 - 1), st.integers(1, 120), st.sampled_from([2, 3]),
       st.sampled_from([0, 4]))
def test_hypervolume_equals_moocore_x64(seed, n, m, tie_levels):
  rng = np.random.default_rng(seed)
  F = rng.integers(0, tie_levels, (n, m)) / tie_levels if tie_levels else rng.random((n, m))
  F = F * rng.uniform(0.5, 3.0, m)
  ref = np.full(m, 1.2) * F.max(axis=0).clip(0.5) * rng.uniform(0.7, 1.1)  # some beyond ref
  F[rng.random(n) < 0.2] = F[0]  # duplicates
  # Padding rows (marked invalid) would dominate everything if they were counted.
  padded = np.concatenate([F, np.full((120 - n, m), -1.0)])
  with jax.enable_x64(True):
    ours = float(hypervolume_jit(padded, ref, np.arange(120) < n))
  expected = moocore.hypervolume(F, ref=ref)
  assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n,m", [(40, 4), (15, 5)])
def test_hypervolume_many_objectives_exact(n, m):
  rng = np.random.default_rng(n)
  F = rng.random((n, m))
  ref = np.full(m, 1.05)
  with jax.enable_x64(True):
    ours = float(hypervolume_jit(F, ref))
    estimate = float(jax.jit(pareto.hypervolume_monte_carlo)(F, ref, jax.random.key(0)))
  expected = moocore.hypervolume(F, ref=ref)
  assert ours == pytest.approx(expected, rel=1e-9)
  assert estimate == pytest.approx(expected, rel=0.02)


def test_hypervolume_float32_and_masks():
  rng = np.random.default_rng(3)
  F = rng.random((200, 3)).astype(np.float32)
  ref = np.array([1.1, 1.2, 1.3], np.float32)
  valid = rng.random(200) > 0.3
  expected = moocore.hypervolume(F[valid].astype(np.float64), ref=ref.astype(np.float64))
  G = F.copy()
  G[~valid] = -5.0  # would dominate everything if it were counted
  assert float(hypervolume_jit(G, ref, valid)) == pytest.approx(expected, rel=1e-5)
  G[~valid] = np.nan
  assert float(hypervolume_jit(G, ref)) == pytest.approx(expected, rel=1e-5)
  assert float(hypervolume_jit(F[:3] + 5, ref)) == 0.0  # nothing dominates ref


@pytest.mark.parametrize("m", [2, 3])
def test_hypervolume_contributions_equal_moocore(m):
  rng = np.random.default_rng(m)
  # Noisy points near the simplex, on a 0.05 grid: ties, duplicates, dominated rows.
  F = rng.dirichlet(np.ones(m), 60) + 0.1 * rng.random((60, m))
  F = np.round(F * 20) / 20
  F[-5:] = F[:5]
  ref = np.full(m, 1.05)
  with jax.enable_x64(True):
    ours = np.asarray(jax.jit(pareto.hypervolume_contributions)(F, ref))
  expected = moocore.hv_contributions(F, ref=ref, ignore_dominated=False)
  np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)
  assert (expected > 0).sum() >= 3  # the test has teeth


# ----------------------------------------------------------------------------- R2, weights


@settings(**SETTINGS)
@given(objective_sets)
def test_r2_equals_numpy(case):
  F, valid, ok = random_objectives(*case)
  m = F.shape[1]
  weights = np.asarray(pareto.uniform_weights(m, 5))
  utopia = np.zeros(m, np.float32)
  ours = float(jax.jit(pareto.r2_indicator)(F, utopia, weights, valid))
  if not ok.any():
    assert ours == np.inf
    return
  G = F[ok].astype(np.float64)
  expected = np.mean([np.min(np.max(w * np.abs(utopia - G), axis=1)) for w in weights])
  assert ours == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("m,h", [(2, 10), (3, 12), (4, 5), (1, 3)])
def test_uniform_weights_equal_das_dennis(m, h):
  ours = np.asarray(pareto.uniform_weights(m, h))
  assert ours.shape == (math.comb(h + m - 1, m - 1), m)
  np.testing.assert_allclose(ours.sum(axis=1), 1, rtol=1e-6)
  if m > 1:
    theirs = get_reference_directions("das-dennis", m, n_partitions=h)
    key = lambda a: np.round(a[np.lexsort(a.T[::-1])], 6)
    np.testing.assert_allclose(key(ours), key(theirs), atol=1e-6)


# ----------------------------------------------------------------------------- vmap, errors


def test_vmap_per_species_equals_loop():
  # Same shapes and k as the hypothesis tests, so the per-species calls reuse compilations.
  rng = np.random.default_rng(11)
  F = rng.integers(0, 4, (3, PAD, 3)).astype(np.float32)
  valid = rng.random((3, PAD)) > 0.2
  ref = np.full(3, 4.0, np.float32)
  dirs = pareto.uniform_weights(3, 4)
  ranks = jax.jit(jax.vmap(pareto.nondominated_rank))(F, valid)
  hvs = jax.jit(jax.vmap(pareto.hypervolume, in_axes=(0, None, 0)))(F, ref, valid)
  picks = jax.jit(jax.vmap(lambda f, v: pareto.nsga3_select(f, 80, dirs, v)))(F, valid)
  picks2 = jax.jit(jax.vmap(lambda f, v: pareto.nsga2_select(f, 80, v)))(F, valid)
  for s in range(3):
    np.testing.assert_array_equal(ranks[s], brute_rank(F[s], valid[s]))
    assert float(hvs[s]) == pytest.approx(
        moocore.hypervolume(F[s][valid[s]].astype(np.float64), ref=ref), rel=1e-5)
    np.testing.assert_array_equal(picks[s], nsga3_jit(F[s], 80, dirs, valid[s]))
    np.testing.assert_array_equal(picks2[s], nsga2_jit(F[s], 80, valid[s]))


def test_bad_input_raises_at_trace_time():
  F = np.zeros((5, 2), np.float32)
  with pytest.raises(ValueError, match="2-D"):
    jax.jit(pareto.nondominated_rank)(np.zeros(5))
  with pytest.raises(ValueError, match="ref"):
    pareto.hypervolume(F, np.ones(3))
  with pytest.raises(ValueError, match="finite"):
    pareto.hypervolume(F, np.array([1.0, np.inf]))
  with pytest.raises(ValueError, match="k must"):
    pareto.nsga2_select(F, 6)
  with pytest.raises(ValueError, match="valid"):
    pareto.nondominated_rank(F, np.ones(4, bool))
  with pytest.raises(ValueError, match="weights"):
    pareto.r2_indicator(F, np.zeros(2), np.ones((3, 3)))
  with pytest.raises(ValueError, match="ref_dirs"):
    pareto.nsga3_select(F, 2, np.ones((4, 3)))
  with pytest.raises(ValueError, match="n_partitions"):
    pareto.uniform_weights(3, 0)
