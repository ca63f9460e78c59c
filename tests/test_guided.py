"""No wasted evaluation, allocation that follows value, sensitivity-informed search
(nemo_jax/_src/search/guide.py, species.py, run/search.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemo_jax
from nemo_jax import evolution
from nemo_jax._src.search import engine as engine_lib
from nemo_jax._src.search import guide as guide_lib
from nemo_jax._src.search import species as species_lib
from tests.conftest import SMOKE

K = 4


# --------------------------------------------------------------------------- the guide


def test_greedy_frontier_hand_computed():
  # Two nodes, three choices. Cost = 3 * choice0 + 1 * choice1 (node 0 is the costly one).
  # Node 0 loses 0.01 per level, node 1 loses 0.10 per level: node 0 goes down first.
  drop = np.asarray([[0.02, 0.01, 0.0], [0.20, 0.10, 0.0]], np.float32)
  cost = lambda c: 3.0 * c[:, 0] + 1.0 * c[:, 1]
  rows, costs = guide_lib.greedy_frontier(drop, cost)
  assert rows.tolist() == [[2, 2], [1, 2], [0, 2], [0, 1], [0, 0]]
  assert costs.tolist() == [8.0, 5.0, 2.0, 1.0, 0.0]
  g = guide_lib.SearchGuide(drop, rows, costs)
  assert g.spread(3).tolist() == [[2, 2], [1, 2], [0, 0]]     # nearest to costs 8, 4, 0
  w = g.mutation_weights()
  assert w.mean() == pytest.approx(1.0) and w[0] > w[1]     # the insensitive node moves more
  # A noisy table (a lower bit-width scoring better) charges the move EPS, not a gain.
  noisy = np.asarray([[-0.01, 0.0, 0.0], [0.2, 0.1, 0.0]], np.float32)
  rows, _ = guide_lib.greedy_frontier(noisy, cost)
  assert rows[1].tolist() == [1, 2]


def test_drop_matrix_maps_table_bits_to_choices():
  table = {"node_index": [3, 1], "bits": [2, 4], "drop": [[0.3, 0.1], [0.2, 0.05]]}
  m = guide_lib.drop_matrix(table, [2, 4, 8], [1, 3])
  np.testing.assert_allclose(m, [[0.2, 0.05, 0.0], [0.3, 0.1, 0.0]])
  with pytest.raises(ValueError, match="no entry for searched node"):
    guide_lib.drop_matrix(table, [2, 4, 8], [0])


def test_coarse_to_fine_prefixes_spread_over_the_whole_range():
  order = species_lib.coarse_to_fine(9)
  assert sorted(order.tolist()) == list(range(9))
  assert order[:3].tolist() == [0, 8, 4]
  assert set(order[:5].tolist()) == {0, 2, 4, 6, 8}


# --------------------------------------------------------------------------- seeds


def _space(n=6):
  return evolution.SearchSpace(num_nodes=n, active_nodes=tuple(range(n)), num_choices=K,
                               num_keep=1)


def test_seeded_species_never_start_with_the_same_configuration():
  cfg = nemo_jax.load_search_config(SMOKE, population=16, min_species_size=2, species=[
      {"kind": "direct_round", "seed_uniform": True},
      {"kind": "direct_floor", "seed_uniform": True, "seed_greedy": True},
      {"kind": "direct_round", "seed_greedy": True}, "direct_floor"])
  drop = np.tile(np.linspace(0.3, 0.0, K)[None], (6, 1)).astype(np.float32)
  rows, costs = guide_lib.greedy_frontier(drop, lambda c: c.sum(1).astype(np.float64))
  guide = guide_lib.SearchGuide(drop, rows, costs)
  seeds = species_lib.seed_rows(_space(), cfg.search.species, [4, 4, 4, 4], guide)
  flat = [r.tobytes() for s in seeds for r in s]
  assert len(flat) == len(set(flat))                          # no duplicate evaluation
  assert len(seeds[3]) == 0 and len(seeds[0]) and len(seeds[1]) == 4 and len(seeds[2]) == 4
  uniform = [np.unique(r).size == 1 for r in seeds[0]]
  assert all(uniform)                                         # uniform levels only
  assert any(np.unique(r).size > 1 for r in seeds[2])         # frontier rows mix levels
  with pytest.raises(ValueError, match="seed_greedy: the search has no sensitivity guide"):
    species_lib.seed_rows(_space(), cfg.search.species, [4, 4, 4, 4], None)


# --------------------------------------------------------------------------- allocation


def _useless_then_strong(space, specs, species_indices, capacity, graph, feature_dim):
  """Always the alternating lowest / highest configuration."""
  fixed = jnp.asarray(np.arange(len(space.active_nodes)) % 2 * (space.num_choices - 1),
                      jnp.int32)

  def decode(genomes):
    shape = genomes.shape[:2]
    return jnp.broadcast_to(fixed, shape + fixed.shape), jnp.zeros(shape, jnp.int32)

  return evolution.ga_group("late", species_indices, lambda key: jnp.zeros(
      (len(specs), capacity, 1)), lambda key, p, priority, sizes: p, decode)


def test_a_useless_species_shrinks_to_one_and_grows_back_when_it_contributes():
  reg = nemo_jax.Registries().with_species("late", _useless_then_strong)
  cfg = nemo_jax.load_search_config(
      SMOKE, reg, objectives=["top1_error", "model_ratio"], species=["direct_round", "late"],
      population=12, min_species_size=1, ucb_c=0.05, resize=True, utility="hv_contribution")
  space = _space(6)
  eng = engine_lib.Engine(cfg.search, space, None, 1, ("top1_error", "model_ratio"),
                          reg.species, num_objectives=2)
  fixed = np.arange(6) % 2 * (K - 1)

  def score(choice, g):
    x = np.asarray(choice, np.float32) / (K - 1)
    cost, spread = x.mean(-1), x.std(-1)
    error = (1.0 - cost) ** 2 + 0.5 * spread
    if g >= 5:   # from generation 5 on, the "late" configuration is the best there is
      is_late = np.all(np.asarray(choice) == fixed, axis=-1)
      error = np.where(is_late, 0.0, error)
      cost = np.where(is_late, 0.05, cost)
    return jnp.asarray(np.stack([error, cost], -1), jnp.float32)

  state, batch = eng.init_state(jax.random.key(0))
  zeros = jnp.zeros((batch.choice.shape[0],), jnp.float32)
  F = score(batch.choice, 0)
  state = eng.finish_init(state, batch, F, zeros, F)
  sizes = [np.asarray(state.sizes)]
  for g in range(1, 10):
    proposal, batch = eng.propose(state)
    F = score(batch.choice, g)
    state, _ = eng.select(state, proposal, batch, F, zeros, F)
    sizes.append(np.asarray(state.sizes))
  late = [int(s[1]) for s in sizes]
  assert min(late[1:5]) == 1, late            # shrank to the minimum of 1 within 4 gens
  assert max(late[6:]) >= 3, late             # and grew back once it contributed


def test_search_stops_at_a_budget_of_distinct_evaluations(smoke_problem, tmp_path):
  res = nemo_jax.search(SMOKE, out_dir=None, progress=False, problem=smoke_problem,
                        generations=20, budget=30, final_split=None, selection_per_class=0)
  unique = [r["unique_evaluations"] for r in res.history]
  assert unique[-1] >= 30 and unique[-2] < 30 and len(res.history) < 21
  assert all(b >= a for a, b in zip(unique, unique[1:]))
  assert all(r["unique_evaluations"] <= r["evaluations"] for r in res.history)


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("species, extra", [
    (["greedy", "direct_round"], {}),
    ([{"kind": "direct_round", "seed_greedy": True, "sensitivity_mutation": True},
      {"kind": "gcn", "hidden": 8}], {"sensitivity_features": True}),
])
def test_sensitivity_informed_species_run(tmp_path, monkeypatch, species, extra):
  monkeypatch.setenv("NEMO_JAX_CACHE_DIR", str(tmp_path / "cache"))
  cfg = nemo_jax.load_search_config(SMOKE, species=species, bit_choices=[2, 4, 8],
                                    population=8, generations=2, min_species_size=2,
                                    final_split=None, selection_per_class=0, **extra)
  res = nemo_jax.search(cfg, out_dir=None, progress=False)
  assert res.front and res.sensitivity is not None
  if species[0] == "greedy":
    # The greedy species' members are frontier rows, all distinct over the run.
    greedy = [m for m in res.front if m["species"] == "greedy"]
    assert len({(tuple(m["w_bits"]), tuple(m["a_bits"])) for m in greedy}) == len(greedy)
