"""Species resizing: utility normalisation, allocation, random fill, and end to end.

The end-to-end tests drive the real engine (every group's init / ask / tell, joint
ranking, utilities, UCB allocation, random fill) on a synthetic two-objective problem
whose front is known, so a species fixed to front configurations is clearly better and
one fixed to a dominated configuration is useless.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemo_jax import evolution
from nemo_jax._src.problem import SearchSpace
from nemo_jax._src.registries import Registries
from nemo_jax._src.run.config import load_search_config
from nemo_jax._src.search import engine as engine_lib
from nemo_jax._src.search import species as species_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "configs", "smoke.py")


# --------------------------------------------------------------------------- normalisation

def test_ratio_normalisation_hand_computed():
  # R2 (lower is better): q = 1 / R2 = (10, 5, 2.5); value = q / max q.
  v = engine_lib.normalise_utility(jnp.array([0.1, 0.2, 0.4]), False, "ratio")
  np.testing.assert_allclose(np.asarray(v), [1.0, 0.5, 0.25], rtol=1e-6)
  # Temperature 0.5 squares the ratios, 2 takes their square roots.
  v = engine_lib.normalise_utility(jnp.array([0.1, 0.2, 0.4]), False, "ratio", 0.5)
  np.testing.assert_allclose(np.asarray(v), [1.0, 0.25, 0.0625], rtol=1e-6)
  v = engine_lib.normalise_utility(jnp.array([4.0, 1.0, 0.0]), True, "ratio", 2.0)
  np.testing.assert_allclose(np.asarray(v), [1.0, 0.5, 0.0], rtol=1e-6)
  # A species with no evaluated member (R2 = inf) gets 0; all zero scores: all 1.
  v = engine_lib.normalise_utility(jnp.array([0.1, jnp.inf]), False, "ratio")
  np.testing.assert_allclose(np.asarray(v), [1.0, 0.0])
  v = engine_lib.normalise_utility(jnp.array([0.0, 0.0, 0.0]), True, "ratio")
  np.testing.assert_allclose(np.asarray(v), [1.0, 1.0, 1.0])


def test_ratio_is_stable_under_noise_where_minmax_is_not():
  # Four species whose R2 differ by noise only (1%): ratio values stay within 2% of each
  # other, min-max still spreads them over the whole [0, 1] (worst = 0, best = 1).
  raw = jnp.array([0.100, 0.101, 0.099, 0.1005])
  ratio = np.asarray(engine_lib.normalise_utility(raw, False, "ratio"))
  minmax = np.asarray(engine_lib.normalise_utility(raw, False, "minmax"))
  assert ratio.max() - ratio.min() < 0.02
  np.testing.assert_allclose(minmax, [0.5, 0.0, 1.0, 0.25], atol=1e-4)


def test_allocation_without_growth_cap_hand_computed():
  # Values (1, 0, 0, 0), no exploration: after the minimum (4 each) the 16 extra slots go
  # to species 0 by D'Hondt until its capacity 20; with the 2x cap it stops at 16.
  args = (jnp.array([1.0, 0.0, 0.0, 0.0]), jnp.array([10, 10, 10, 10]),
          jnp.array([8, 8, 8, 8], jnp.int32), 32, 4, 20, 0.0)
  assert list(np.asarray(engine_lib.allocate_sizes(*args, max_growth=None))) == [20, 4, 4, 4]
  assert list(np.asarray(engine_lib.allocate_sizes(*args, max_growth=2.0))) == [16, 6, 5, 5]
  # Values (1, 0.5), 8 extra slots. Quotients value / (extra + 1) in seating order
  # (ties go to the first species): A 1, A 1/2 (= B 1/2), B 1/2, A 1/3, A 1/4 (= B 1/4),
  # B 1/4, A 1/5, A 1/6 (= B 1/6): A gets 6 extra, B 2.
  sizes = engine_lib.allocate_sizes(jnp.array([1.0, 0.5]), jnp.array([5, 5]),
                                    jnp.array([6, 6], jnp.int32), 12, 2, 10, 0.0, None)
  assert list(np.asarray(sizes)) == [8, 4]


def test_fill_counts_and_random_fill():
  # A species grown to 7 from 2 parents + 2 offspring keeps 4 and gets 3 random slots:
  # the engine counts the live evaluated members of every species (its ``propose``).
  eng = _engine()   # 3 species, capacity 8
  num_candidates = jnp.array([4, 6, 4])
  priority = jnp.where(jnp.arange(eng.capacity)[None] < num_candidates[:, None], 0,
                       engine_lib.INT_MAX)
  kept = jnp.sum(eng._alive(jnp.array([7, 3, 2])) & (priority < engine_lib.INT_MAX), axis=1)
  np.testing.assert_array_equal(np.asarray(kept), [4, 3, 2])
  offspring = jnp.zeros((2, 5, 3))
  fresh = jnp.ones((2, 5, 3))
  out = np.asarray(engine_lib.random_fill({"g": offspring}, {"g": fresh},
                                          jnp.array([2, 5]), 5)["g"])
  np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 1, 1])
  np.testing.assert_array_equal(out[1, :, 0], [0, 0, 0, 0, 0])


def test_uniform_seed_genes():
  g = np.asarray(species_lib.uniform_seed_genes(4, 3, 4, 7, 2))
  np.testing.assert_array_equal(g[:, :3], [[0] * 3, [2] * 3, [4] * 3, [6] * 3])
  np.testing.assert_array_equal(g[:, 3], [1, 1, 1, 1])      # largest keep ratio
  np.testing.assert_array_equal(np.asarray(species_lib.uniform_seed_genes(1, 2, 2, 7, 1)),
                                [[6, 6]])


# --------------------------------------------------------------------------- end to end

NUM_ACTIVE, K = 12, 7


def strong_species(space, specs, species_indices, capacity, graph, feature_dim):
  """Uniform-precision configs only: on the synthetic problem these ARE the front."""
  k = space.num_choices

  def init(key):
    return jax.random.uniform(key, (len(specs), capacity, 1), maxval=k - 1.0)

  def decode(genomes):
    idx = jnp.clip(jnp.round(genomes[..., 0]), 0, k - 1).astype(jnp.int32)
    return (jnp.broadcast_to(idx[..., None], idx.shape + (len(space.active_nodes),)),
            jnp.zeros(idx.shape, jnp.int32))

  def vary(key, parents, priority, sizes):
    return jnp.clip(parents + 0.8 * jax.random.normal(key, parents.shape), 0.0, k - 1.0)

  return evolution.ga_group("strong", species_indices, init, vary, decode)


def useless_species(space, specs, species_indices, capacity, graph, feature_dim):
  """Always the same dominated config (alternating lowest / highest bit choice)."""
  k = space.num_choices
  fixed = jnp.asarray(np.arange(len(space.active_nodes)) % 2 * (k - 1), jnp.int32)

  def init(key):
    return jnp.zeros((len(specs), capacity, 1))

  def decode(genomes):
    shape = genomes.shape[:2]
    return jnp.broadcast_to(fixed, shape + fixed.shape), jnp.zeros(shape, jnp.int32)

  return evolution.ga_group("useless", species_indices, init,
                            lambda key, p, priority, sizes: p, decode)


def synthetic_objectives(choice, key):
  """Two objectives of choice indices [P, n]: cost = mean level, error = (1 - cost)^2 +
  spread penalty + noise; uniform configs are exactly the front (noise 0.002)."""
  x = choice.astype(jnp.float32) / (K - 1)
  cost = x.mean(-1)
  error = (1.0 - cost) ** 2 + 0.5 * x.std(-1) + 0.002 * jax.random.uniform(key, cost.shape)
  return jnp.stack([error, cost], axis=-1)


def run_engine(generations, **overrides):
  registries = (Registries().with_species("strong", strong_species)
                .with_species("useless", useless_species))
  cfg = load_search_config(SMOKE, registries, objectives=["top1_error", "model_ratio"],
                           species=["direct_round", "strong", "useless"], population=24,
                           min_species_size=3, generations=generations, **overrides)
  space = SearchSpace(num_nodes=NUM_ACTIVE, active_nodes=tuple(range(NUM_ACTIVE)),
                      num_choices=K, num_keep=1)
  eng = engine_lib.Engine(cfg.search, space, None, 1, ("top1_error", "model_ratio"),
                          registries.species, num_objectives=len(cfg.objectives),
                          hv_ref=cfg.hv_ref)
  score = jax.jit(synthetic_objectives)
  state, batch = eng.init_state(jax.random.key(cfg.seed))
  n = batch.choice.shape[0]
  zeros = jnp.zeros((n,), jnp.float32)
  F = score(batch.choice, jax.random.key(1000))
  state = eng.finish_init(state, batch, F, zeros, F)
  sizes, values = [np.asarray(state.sizes)], []
  for g in range(generations):
    proposal, batch = eng.propose(state)
    F = score(batch.choice, jax.random.key(g))
    state, metrics = eng.select(state, proposal, batch, F, zeros, F)
    sizes.append(np.asarray(state.sizes))
    values.append(np.asarray(metrics.value))
  return np.asarray(sizes), np.asarray(values), state


@pytest.mark.parametrize("utility", ["r2", "front_count", "hv_contribution"])
def test_better_species_gains_slots_useless_shrinks_to_minimum(utility):
  sizes, values, state = run_engine(6, utility=utility, ucb_c=0.1)
  assert list(sizes[0]) == [8, 8, 8]
  assert sizes.sum(1).tolist() == [24] * 7                  # every generation: population
  strong, useless = sizes[-1, 1], sizes[-1, 2]
  assert useless == 3, sizes                                # the minimum
  assert strong >= 14 and strong == sizes[-1].max(), sizes
  assert (values[:, 1] > 0.999).all() and (values[:, 2] < 0.1).all(), values
  # The strong species grew past its evaluated candidates at least once: random fill.
  assert np.any(sizes[1:, 1] > 2 * sizes[:-1, 1]) or strong > 16
  # Every live member of the final state was evaluated or is a pending random slot.
  alive = np.arange(state.F.shape[1])[None] < np.asarray(state.sizes)[:, None]
  evaluated = np.asarray(state.priority) < engine_lib.INT_MAX
  assert np.all(np.isfinite(np.asarray(state.F))[..., 0][evaluated])
  assert not np.any(evaluated & ~alive)


def test_random_fill_slots_are_evaluated_next_generation():
  # No growth cap: the strong species jumps from 8 to more than its 16 candidates; the
  # extra slots are fresh genomes, evaluated in the next batch (the batch is always
  # exactly the population and every species' offspring count is its size).
  sizes, _, state = run_engine(1, utility="front_count", ucb_c=0.0)
  assert sizes[1, 1] > 16, sizes
  num_parents = np.sum(np.asarray(state.priority) < engine_lib.INT_MAX, axis=1)
  assert num_parents[1] == 16                               # 8 parents + 8 offspring kept
  assert (num_parents <= np.asarray(state.sizes)).all()


def test_growth_cap_keeps_every_slot_evaluated():
  sizes, _, state = run_engine(3, utility="front_count", ucb_c=0.0, max_growth=2.0)
  assert np.all(sizes[1:] <= 2 * sizes[:-1])
  num_parents = np.sum(np.asarray(state.priority) < engine_lib.INT_MAX, axis=1)
  np.testing.assert_array_equal(num_parents, np.asarray(state.sizes))


def test_resizing_config_validation():
  with pytest.raises(ValueError, match="utility.*hv_contribution"):
    load_search_config(SMOKE, utility="hypervolume")
  with pytest.raises(ValueError, match="utility_norm.*ratio"):
    load_search_config(SMOKE, utility_norm="softmax")
  with pytest.raises(ValueError, match="utility_temperature"):
    load_search_config(SMOKE, utility_temperature=0.0)
  with pytest.raises(ValueError, match="utility_temperature"):
    load_search_config(SMOKE, utility_temperature=2.0, utility_norm="minmax")
  with pytest.raises(ValueError, match="max_growth"):
    load_search_config(SMOKE, max_growth=0.5)
  cfg = load_search_config(SMOKE, max_growth=3, utility="hv_contribution")
  assert cfg.max_growth == 3 and cfg.flat_dict()["utility"] == "hv_contribution"


def _engine(**overrides):
  cfg = load_search_config(SMOKE, objectives=["top1_error", "model_ratio"], population=12,
                           min_species_size=2, species=["direct_round"] * 3, **overrides)
  space = SearchSpace(num_nodes=4, active_nodes=tuple(range(4)), num_choices=K, num_keep=1)
  return engine_lib.Engine(cfg.search, space, None, 1, ("top1_error", "model_ratio"),
                           num_objectives=len(cfg.objectives), hv_ref=cfg.hv_ref)


def test_utilities_hand_computed():
  # Species A: (0.2, 0.6); B: (0.6, 0.2); C: (0.7, 0.7), dominated; ref (1, 1).
  # HV(all) = 0.8 * 0.4 + 0.4 * 0.8 - 0.4 * 0.4 = 0.48; without A (or B): 0.32 -> 0.16
  # each; without C: 0.48 -> 0. A second, invalid slot per species holds a better point
  # that must be ignored.
  F = jnp.asarray([[[0.2, 0.6], [0.0, 0.0]], [[0.6, 0.2], [0.0, 0.0]],
                   [[0.7, 0.7], [0.0, 0.0]]], jnp.float32)
  valid = jnp.asarray([[True, False]] * 3)
  rank = jnp.asarray([[0, 0], [0, 0], [1, 0]])
  violation = jnp.zeros((3, 2))
  value, raw = _engine(utility="hv_contribution")._utilities(F, valid, rank, violation)
  np.testing.assert_allclose(np.asarray(raw), [0.16, 0.16, 0.0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(value), [1.0, 1.0, 0.0], atol=1e-5)
  value, raw = _engine(utility="front_count")._utilities(F, valid, rank, violation)
  np.testing.assert_array_equal(np.asarray(raw), [1, 1, 0])
  # R2 with weights on the simplex: the numpy reference of the Tchebycheff form.
  eng = _engine(utility="r2", utility_temperature=1.0)
  value, raw = eng._utilities(F, valid, rank, violation)
  w = np.asarray(eng.ref_dirs)
  want = [np.mean(np.max(w * np.asarray(F[s, 0]), axis=1)) for s in range(3)]
  np.testing.assert_allclose(np.asarray(raw), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(value), min(want) / np.asarray(want), rtol=1e-5)
