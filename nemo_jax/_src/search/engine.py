"""The NEMO search engine: a generation as two jitted pure functions around the accuracy call.

A generation (NEMO's Algorithm 1, with static shapes throughout):

1. ``propose`` (jit): every species doubles: ``size_s`` offspring from its ``size_s``
   parents (SBX + polynomial mutation, SSNE, fresh random genomes, or an evosax
   ``ask``); decode all of them to choice indices; gather the live offspring of all
   species into one dense batch of exactly ``population`` configs.
2. the problem scores the batch: costs (jit) + batched accuracy (the only step that
   leaves jit).
3. ``select`` (jit): joint ranking of parents + offspring of ALL species (constraint
   domination, then NSGA-III reference-direction niching or NSGA-II crowding) ->
   utility per species (R2 against the utopian point, or the number of members on
   the joint front) -> UCB allocation of the next sizes (minimum size per species,
   growth at most x2 so every slot is filled by an evaluated candidate) -> each
   species keeps its best-ranked candidates -> evosax ``tell`` -> the archive of every
   non-dominated configuration seen (deduplicated) is updated.

The whole search state is one pytree (checkpointed with orbax every generation), and
every random choice comes from the PRNG key inside it: the same config and seed give
the same result, and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax import pareto
from nemo_jax._src.search import species as species_lib
from nemo_jax._src.search.config import SearchConfig

BIG = 1e6  # finite "very bad" fitness for evosax (NaN-free fitness shaping)


def species_capacity(cfg: SearchConfig) -> int:
  """Largest size a species can reach: population - (S-1) * min_species_size."""
  return cfg.population - (len(cfg.species) - 1) * cfg.min_species_size


def initial_sizes(cfg: SearchConfig) -> np.ndarray:
  s = len(cfg.species)
  sizes = np.full(s, cfg.population // s, np.int32)
  sizes[: cfg.population % s] += 1
  return sizes


def allocate_sizes(value, evals, old_sizes, total: int, min_size: int, capacity: int,
                   ucb_c: float):
  """UCB1 allocation of ``total`` slots to species (jit-compatible).

  ``a_s = value_s + c * sqrt(ln(sum_y) / y_s)`` with ``value`` in [0, 1] (higher is
  better) and ``y_s`` the species' evaluation count. Every species gets
  ``min_size``; the remaining slots go one by one to the species with the largest
  ``a_s / (extra_s + 1)`` (D'Hondt apportionment, exact integer sum) among those
  still below their cap ``min(2 * old_size, capacity)``.

  Returns:
    int32 sizes ``[S]`` summing to ``total``.
  """
  evals = jnp.maximum(evals.astype(jnp.float32), 1.0)
  score = value + ucb_c * jnp.sqrt(jnp.log(jnp.sum(evals)) / evals)
  score = jnp.maximum(score, 1e-6)
  cap = jnp.minimum(2 * old_sizes, capacity)
  sizes = jnp.full_like(old_sizes, min_size)

  def seat(_, sizes):
    quotient = jnp.where(sizes < cap, score / (sizes - min_size + 1.0), -jnp.inf)
    return sizes.at[jnp.argmax(quotient)].add(1)

  return jax.lax.fori_loop(0, total - min_size * old_sizes.shape[0], seat, sizes)


def _normalise_for_niching(F, valid, rank):
  """Ideal/nadir normalisation (nadir from the first front; falls back to the max)."""
  big = jnp.where(valid[:, None], F, jnp.inf)
  ideal = jnp.min(big, axis=0)
  first = valid & (rank == 0)
  nadir = jnp.max(jnp.where(first[:, None], F, -jnp.inf), axis=0)
  worst = jnp.max(jnp.where(valid[:, None], F, -jnp.inf), axis=0)
  nadir = jnp.where(nadir - ideal > 1e-12, nadir, worst)
  span = jnp.where(nadir - ideal > 1e-12, nadir - ideal, 1.0)
  return jnp.where(valid[:, None], (F - ideal) / span, 0.0)


def joint_priority(F, violation, valid, ref_dirs, selection: str):
  """A total order of the population (0 = best), jointly over all species.

  ``nsga3``: constrained non-dominated rank, then NSGA-III niching: members are
  associated with their nearest reference direction (perpendicular distance on the
  normalised objectives); inside a front, the closest member of every niche comes
  first, then the second closest of every niche, and so on (the deterministic order
  NSGA-III's niche-preserving selection fills a last front with). ``nsga2``: rank,
  then descending crowding distance. Ties break by index. Invalid rows come last.

  Returns:
    ``(priority int32 [N], rank int32 [N])``.
  """
  n = F.shape[0]
  rank = pareto.constrained_rank(F, violation, valid=valid)
  idx = jnp.arange(n)
  if selection == "nsga2":
    crowd = pareto.crowding_distance(F, rank, valid=valid)
    second = -jnp.where(jnp.isfinite(crowd), crowd, jnp.finfo(jnp.float32).max)
  else:
    Fn = _normalise_for_niching(F, valid, rank)
    dirs = ref_dirs / jnp.linalg.norm(ref_dirs, axis=1, keepdims=True)
    proj = Fn @ dirs.T                                              # [N, D]
    dist2 = jnp.sum(Fn**2, axis=1, keepdims=True) - proj**2
    dist = jnp.sqrt(jnp.maximum(dist2, 0.0))
    niche = jnp.argmin(dist, axis=1)
    d = jnp.min(dist, axis=1)
    same = (rank[:, None] == rank[None, :]) & (niche[:, None] == niche[None, :]) & valid[None, :]
    closer = (d[None, :] < d[:, None]) | ((d[None, :] == d[:, None]) & (idx[None, :] < idx[:, None]))
    round_ = jnp.sum(same & closer, axis=1)
    second = round_.astype(jnp.float32) * 4.0 + d  # round first, distance breaks ties
  big_rank = jnp.where(valid, rank, jnp.iinfo(jnp.int32).max)
  order = jnp.lexsort((idx, second, big_rank))
  priority = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return priority, rank


def _dedup(keys, valid):
  """Marks rows whose key equals an earlier valid row's key (stable: first one wins)."""
  n = keys.shape[0]
  cols = tuple(keys[:, j] for j in reversed(range(keys.shape[1])))
  order = jnp.lexsort((jnp.arange(n),) + cols + (~valid,))
  sorted_keys = keys[order]
  same_prev = jnp.concatenate([jnp.array([False]),
                               jnp.all(sorted_keys[1:] == sorted_keys[:-1], axis=1)])
  sorted_valid = valid[order]
  same_prev = same_prev & sorted_valid & jnp.concatenate([jnp.array([False]), sorted_valid[:-1]])
  dup = jnp.zeros(n, bool).at[order].set(same_prev)
  return valid & ~dup


def update_archive(archive: dict, new: dict) -> dict:
  """Keeps every (feasible-first) non-dominated, distinct configuration seen.

  Rows of ``archive`` and ``new`` are dicts of arrays with the same keys; ``valid``
  marks real rows, ``key`` (int32 ``[R, K]``) identifies a configuration. If more
  than the capacity are non-dominated, the most crowded ones are dropped.
  """
  cap = archive["valid"].shape[0]
  rows = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), archive, new)
  finite = jnp.all(jnp.isfinite(rows["F"]), axis=1)
  valid = _dedup(rows["key"], rows["valid"] & finite)
  rank = pareto.constrained_rank(rows["F"], rows["violation"], valid=valid)
  keep = valid & (rank == 0)
  crowd = pareto.crowding_distance(rows["F"], jnp.where(keep, 0, 1), valid=keep)
  crowd = jnp.where(jnp.isfinite(crowd), crowd, jnp.finfo(jnp.float32).max)
  order = jnp.lexsort((jnp.arange(keep.shape[0]), -crowd, ~keep))[:cap]
  out = jax.tree.map(lambda x: x[order], rows)
  out["valid"] = keep[order]
  return out


def tchebycheff(F, weights=None):
  """Scalarised fitness for evosax species: weighted max distance to the utopian point 0."""
  m = F.shape[-1]
  w = jnp.full((m,), 1.0 / m) if weights is None else weights
  return jnp.max(w * F, axis=-1)


@dataclasses.dataclass
class Engine:
  """Builds the jitted ``init``, ``propose`` and ``select`` functions for one problem.

  Args:
    cfg: the validated search config.
    space: the species' decode space (``species.SearchSpace``).
    graph: the workload ``jraph.GraphsTuple`` (GNN species input).
    feature_dim: node feature width.
    raw_names: names of the raw quantities stored per member (for reports).
  """
  cfg: SearchConfig
  space: species_lib.SearchSpace
  graph: Any
  feature_dim: int
  raw_names: tuple[str, ...]

  def __post_init__(self):
    cfg = self.cfg
    self.num_species = len(cfg.species)
    self.capacity = species_capacity(cfg)
    self.groups = species_lib.build_groups(cfg, self.space, self.capacity, self.graph,
                                           self.feature_dim)
    order = [i for g in self.groups for i in g.species]
    self._species_perm = np.argsort(np.asarray(order))
    m = len(cfg.objectives)
    self.ref_dirs = jnp.asarray(pareto.uniform_weights(m, cfg.r2_partitions), jnp.float32)
    self.propose = jax.jit(self._propose)
    self.select = jax.jit(self._select)
    self.init_state = jax.jit(self._init_state)
    self.finish_init = jax.jit(self._finish_init)

  # ---------------------------------------------------------------- helpers
  def _by_species(self, per_group):
    """Concatenates per-group ``[S_g, ...]`` arrays and reorders to species order."""
    return jnp.concatenate(per_group, axis=0)[self._species_perm]

  def _decode_all(self, genomes):
    choices, keeps = [], []
    for g, gen in zip(self.groups, genomes):
      c, k = g.decode(gen)
      choices.append(c)
      keeps.append(k)
    return self._by_species(choices), self._by_species(keeps)

  def _alive(self, sizes):
    return jnp.arange(self.capacity)[None, :] < sizes[:, None]

  def _gather_live(self, sizes):
    """Flat indices (into [S*C]) of the live members: exactly ``population`` of them."""
    return jnp.nonzero(self._alive(sizes).reshape(-1), size=self.cfg.population)[0]

  def member_key(self, choice, keep_idx):
    return jnp.concatenate([choice, keep_idx[..., None]], axis=-1).astype(jnp.int32)

  # ---------------------------------------------------------------- generation 0
  def _init_state(self, key):
    """Random genomes for every species; returns (state, batch to evaluate)."""
    cfg = self.cfg
    key, *gkeys = jax.random.split(key, len(self.groups) + 1)
    genomes, evo_states = [], []
    for g, k in zip(self.groups, gkeys):
      if g.strategy is None:
        genomes.append(g.init(k))
        evo_states.append(None)
      else:
        k_i, k_a = jax.random.split(k)
        evo = g.init(k_i)
        x, evo = g.strategy.ask(k_a, evo, g.strategy_params)
        genomes.append(x)
        evo_states.append(evo)
    sizes = jnp.asarray(initial_sizes(cfg))
    choice, keep_idx = self._decode_all(genomes)
    live = self._gather_live(sizes)
    s, c, m = self.num_species, self.capacity, len(cfg.objectives)
    state = {
        "generation": jnp.zeros((), jnp.int32),
        "key": jax.random.key_data(key),
        "genomes": genomes,
        "evo_states": evo_states,
        "sizes": sizes,
        "evals": jnp.zeros((s,), jnp.int32),
        "choice": choice,
        "keep_idx": keep_idx,
        "F": jnp.full((s, c, m), jnp.nan, jnp.float32),
        "violation": jnp.zeros((s, c), jnp.float32),
        "raw": jnp.full((s, c, len(self.raw_names)), jnp.nan, jnp.float32),
        "priority": jnp.zeros((s, c), jnp.int32),
        "archive": self._empty_archive(),
    }
    batch = {"choice": choice.reshape(s * c, -1)[live], "keep_idx": keep_idx.reshape(-1)[live],
             "live": live}
    return state, batch

  def _empty_archive(self):
    a, m = self.cfg.archive_size, len(self.cfg.objectives)
    return {"key": jnp.full((a, len(self.space.active_nodes) + 1), -1, jnp.int32),
            "choice": jnp.zeros((a, len(self.space.active_nodes)), jnp.int32),
            "keep_idx": jnp.zeros((a,), jnp.int32),
            "F": jnp.full((a, m), jnp.nan, jnp.float32),
            "violation": jnp.zeros((a,), jnp.float32),
            "raw": jnp.full((a, len(self.raw_names)), jnp.nan, jnp.float32),
            "species": jnp.full((a,), -1, jnp.int32),
            "generation": jnp.full((a,), -1, jnp.int32),
            "valid": jnp.zeros((a,), bool)}

  def _scatter(self, live, values, fill):
    s, c = self.num_species, self.capacity
    flat = jnp.full((s * c,) + values.shape[1:], fill, values.dtype).at[live].set(values)
    return flat.reshape((s, c) + values.shape[1:])

  def _finish_init(self, state, batch, F, violation, raw):
    """Stores generation 0's scores, ranks the parents, tells evosax, fills the archive."""
    live = batch["live"]
    state = dict(state)
    state["F"] = self._scatter(live, F, jnp.nan)
    state["violation"] = self._scatter(live, violation, 0.0)
    state["raw"] = self._scatter(live, raw, jnp.nan)
    alive = self._alive(state["sizes"])
    s, c = self.num_species, self.capacity
    pri, _ = joint_priority(state["F"].reshape(s * c, -1), state["violation"].reshape(-1),
                            alive.reshape(-1), self.ref_dirs, self.cfg.selection)
    state["priority"] = jnp.where(alive, pri.reshape(s, c), jnp.iinfo(jnp.int32).max)
    state["evals"] = state["sizes"]
    state["evo_states"] = self._tell(state["key"], state["evo_states"], state["genomes"],
                                     state["F"], state["violation"], alive)
    species_id = jnp.repeat(jnp.arange(s), c)[live]
    state["archive"] = update_archive(state["archive"], self._archive_rows(
        batch["choice"], batch["keep_idx"], F, violation, raw, species_id, 0))
    return state

  def _archive_rows(self, choice, keep_idx, F, violation, raw, species_id, generation):
    return {"key": self.member_key(choice, keep_idx), "choice": choice, "keep_idx": keep_idx,
            "F": F, "violation": violation, "raw": raw, "species": species_id.astype(jnp.int32),
            "generation": jnp.full(choice.shape[:1], generation, jnp.int32),
            "valid": jnp.ones(choice.shape[:1], bool)}

  def _tell(self, key_data, evo_states, genomes, F, violation, alive):
    out = []
    for gi, (g, evo) in enumerate(zip(self.groups, evo_states)):
      if g.strategy is None:
        out.append(evo)
        continue
      s = g.species[0]
      fit = tchebycheff(F[s]) + 10.0 * violation[s]
      fit = jnp.where(alive[s] & jnp.isfinite(fit), fit, BIG)
      pop = jax.tree.leaves(genomes[gi])[0].shape[0]
      fit = jnp.concatenate([fit, jnp.full((pop - fit.shape[0],), BIG)])
      k = jax.random.fold_in(jax.random.wrap_key_data(key_data), 1000 + gi)
      new_evo, _ = g.strategy.tell(k, genomes[gi], fit, evo, g.strategy_params)
      out.append(new_evo)
    return out

  # ---------------------------------------------------------------- generations >= 1
  def _propose(self, state):
    """Offspring of every species and the dense batch of live offspring to evaluate."""
    key = jax.random.wrap_key_data(state["key"])
    key, *gkeys = jax.random.split(key, len(self.groups) + 1)
    offspring, evo_asked = [], []
    for g, k, gen, evo in zip(self.groups, gkeys, state["genomes"], state["evo_states"]):
      if g.strategy is None:
        idx = np.asarray(g.species)
        offspring.append(g.vary(k, gen, state["priority"][idx].astype(jnp.float32),
                                state["sizes"][idx]))
        evo_asked.append(None)
      else:
        x, evo = g.strategy.ask(k, evo, g.strategy_params)
        offspring.append(x)
        evo_asked.append(evo)
    choice, keep_idx = self._decode_all(offspring)
    live = self._gather_live(state["sizes"])
    s, c = self.num_species, self.capacity
    proposal = {"genomes": offspring, "evo_states": evo_asked, "choice": choice,
                "keep_idx": keep_idx, "key": jax.random.key_data(key)}
    batch = {"choice": choice.reshape(s * c, -1)[live], "keep_idx": keep_idx.reshape(-1)[live],
             "live": live}
    return proposal, batch

  def _utilities(self, F, valid, rank):
    """Per-species value in [0, 1] (higher is better) and the raw utility."""
    if self.cfg.utility == "front_count":
      raw = jnp.sum(valid & (rank == 0), axis=1).astype(jnp.float32)
      value = raw / jnp.maximum(jnp.max(raw), 1.0)
      return value, raw
    utopia = jnp.zeros((F.shape[-1],), jnp.float32)
    raw = jax.vmap(lambda f, v: pareto.r2_indicator(f, utopia, self.ref_dirs, valid=v))(F, valid)
    finite = jnp.isfinite(raw)
    lo = jnp.min(jnp.where(finite, raw, jnp.inf))
    hi = jnp.max(jnp.where(finite, raw, -jnp.inf))
    value = jnp.where(hi - lo > 1e-12, (hi - raw) / jnp.maximum(hi - lo, 1e-12), 1.0)
    return jnp.where(finite, value, 0.0), raw

  def _select(self, state, proposal, batch, F_new, viol_new, raw_new):
    cfg = self.cfg
    s, c = self.num_species, self.capacity
    live = batch["live"]
    off_F = self._scatter(live, F_new, jnp.nan)
    off_viol = self._scatter(live, viol_new, 0.0)
    off_raw = self._scatter(live, raw_new, jnp.nan)
    alive = self._alive(state["sizes"])
    # Candidates of species s: its parents then its offspring, [S, 2C].
    cand_F = jnp.concatenate([state["F"], off_F], axis=1)
    cand_viol = jnp.concatenate([state["violation"], off_viol], axis=1)
    cand_raw = jnp.concatenate([state["raw"], off_raw], axis=1)
    cand_choice = jnp.concatenate([state["choice"], proposal["choice"]], axis=1)
    cand_keep = jnp.concatenate([state["keep_idx"], proposal["keep_idx"]], axis=1)
    cand_valid = jnp.concatenate([alive, alive], axis=1)
    flat_valid = cand_valid.reshape(-1)
    priority, rank = joint_priority(cand_F.reshape(s * 2 * c, -1), cand_viol.reshape(-1),
                                    flat_valid, self.ref_dirs, cfg.selection)
    priority = jnp.where(flat_valid, priority, jnp.iinfo(jnp.int32).max).reshape(s, 2 * c)
    rank = rank.reshape(s, 2 * c)
    finite = cand_valid & jnp.all(jnp.isfinite(cand_F), axis=-1)
    value, utility = self._utilities(cand_F, finite, rank)
    evals = state["evals"] + state["sizes"]
    if cfg.resize:
      sizes = allocate_sizes(value, evals, state["sizes"], cfg.population,
                             cfg.min_species_size, c, cfg.ucb_c)
    else:
      sizes = state["sizes"]
    # Fill: every species keeps its best-ranked candidates.
    keep_order = jnp.argsort(priority, axis=1, stable=True)[:, :c]      # [S, C]
    take = lambda x: jnp.take_along_axis(x, keep_order.reshape(keep_order.shape + (1,) * (x.ndim - 2)), axis=1)
    new_alive = self._alive(sizes)
    genomes = []
    for g, parents, kids in zip(self.groups, state["genomes"], proposal["genomes"]):
      if g.strategy is not None:
        genomes.append(kids)   # evosax keeps its own population in its state
        continue
      idx = keep_order[np.asarray(g.species)]
      both = jax.tree.map(lambda p, o: jnp.concatenate([p, o], axis=1), parents, kids)
      genomes.append(jax.tree.map(
          lambda x: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1),
          both))
    new_priority = jnp.take_along_axis(priority, keep_order, axis=1)
    new_state = {
        "generation": state["generation"] + 1,
        "key": proposal["key"],
        "genomes": genomes,
        "evo_states": self._tell(proposal["key"], proposal["evo_states"], proposal["genomes"],
                                 off_F, off_viol, alive),
        "sizes": sizes,
        "evals": evals,
        "choice": take(cand_choice),
        "keep_idx": take(cand_keep[..., None])[..., 0],
        "F": jnp.where(new_alive[..., None], take(cand_F), jnp.nan),
        "violation": take(cand_viol[..., None])[..., 0],
        "raw": take(cand_raw),
        "priority": jnp.where(new_alive, new_priority, jnp.iinfo(jnp.int32).max),
    }
    species_id = jnp.repeat(jnp.arange(s), c)[live]
    new_state["archive"] = update_archive(state["archive"], self._archive_rows(
        batch["choice"], batch["keep_idx"], F_new, viol_new, raw_new, species_id,
        state["generation"] + 1))
    front_counts = jnp.sum(finite & (rank == 0), axis=1)
    metrics = {"utility": utility, "value": value, "sizes": sizes, "front_counts": front_counts}
    return new_state, metrics

  def hypervolume(self, archive, ref):
    """Hypervolume of the feasible archive front on the normalised objectives."""
    ok = archive["valid"] & (archive["violation"] <= 0)
    return pareto.hypervolume(archive["F"], ref, valid=ok)
