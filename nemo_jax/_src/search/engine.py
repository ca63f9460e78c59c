"""The NEMO search engine: a generation as two jitted pure functions around the accuracy call.

A generation (NEMO's Algorithm 1, with static shapes throughout):

1. ``propose`` (jit): every species doubles: ``size_s`` offspring from its ``size_s``
   parents (SBX + polynomial mutation, SSNE, fresh random genomes, or an evosax
   ``ask``); decode all of them to choice indices; gather the live offspring of all
   species into one dense batch of exactly ``population`` configs.
2. the problem scores the batch: costs (jit) + batched accuracy (the only step that
   leaves jit).
3. ``select`` (jit): joint ranking of parents + offspring of ALL species
   (``pareto.nsga3_priority`` / ``nsga2_priority``: constraint domination, then
   NSGA-III reference-direction niching for ``population`` survivors, continued
   over every candidate, or NSGA-II crowding) ->
   utility per species (R2 against the utopian point, the number of members on the
   joint front, or the species' exclusive hypervolume contribution), normalised by
   the best species' (:func:`normalise_utility`) -> UCB allocation of the next sizes
   (minimum size per species; optionally a growth cap ``max_growth``) -> each species
   keeps its best-ranked candidates (every group's ``tell``); slots beyond its
   evaluated candidates get random offspring, evaluated in the next generation
   (:func:`random_fill`) -> the archive of every non-dominated configuration seen
   (deduplicated) is updated.

Every species group follows one evosax-style protocol (``species.SpeciesGroup``:
``init`` / ``ask`` / ``tell`` / ``decode``), so the engine never asks which optimiser
drives a species. The whole search state is one typed pytree (:class:`SearchState`,
checkpointed with orbax every generation), and every random choice comes from the PRNG
key inside it: the same config and seed give the same result, and a resumed run equals
an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from nemo_jax._src import pareto
from nemo_jax._src.problem.space import SearchSpace
from nemo_jax._src.search import species as species_lib
from nemo_jax._src.search.config import EvolutionConfig, SpeciesKind


@struct.dataclass
class Archive:
  """Every distinct non-dominated configuration seen (``A`` = ``cfg.archive_size`` rows).

  Rows with ``valid`` False are empty slots. The same type holds rows to add
  (:func:`update_archive`), with their own row count.

  Attributes:
    key: int32 ``[A, num_active + 1]`` identity of a configuration (choices, keep).
    choice: int32 ``[A, num_active]`` bit-choice indices of the searched quantizers.
    keep_idx: int32 ``[A]`` keep-ratio index.
    F: float32 ``[A, M]`` objectives (minimised).
    violation: float32 ``[A]`` total constraint violation (0 = feasible).
    raw: float32 ``[A, R]`` raw quantities (``Engine.raw_names``).
    species: int32 ``[A]`` species that found the configuration.
    generation: int32 ``[A]`` generation it was found in.
    valid: bool ``[A]`` occupied rows.
  """
  key: jax.Array
  choice: jax.Array
  keep_idx: jax.Array
  F: jax.Array
  violation: jax.Array
  raw: jax.Array
  species: jax.Array
  generation: jax.Array
  valid: jax.Array

  def to_dict(self) -> dict:
    """The fields as a plain ``{name: array}`` dict."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@struct.dataclass
class SearchState:
  """The whole search between generations (``S`` species, capacity ``C`` each).

  Attributes:
    generation: int32 ``[]`` generations completed (0 after ``finish_init``).
    key: uint32 PRNG key data (``jax.random.key_data``) for the next generation.
    species: one state per species group (``SpeciesGroup.init`` / ``tell`` output).
    sizes: int32 ``[S]`` live members per species (the first ``sizes[s]`` slots).
    evals: int32 ``[S]`` evaluations spent per species so far.
    choice: int32 ``[S, C, num_active]`` the members' bit-choice indices.
    keep_idx: int32 ``[S, C]`` the members' keep-ratio indices.
    F: float32 ``[S, C, M]`` the members' objectives (NaN in dead slots).
    violation: float32 ``[S, C]`` the members' constraint violation.
    raw: float32 ``[S, C, R]`` the members' raw quantities.
    priority: int32 ``[S, C]`` joint rank of the members (0 = best; int32 max if dead).
    archive: the :class:`Archive`.
  """
  generation: jax.Array
  key: jax.Array
  species: tuple
  sizes: jax.Array
  evals: jax.Array
  choice: jax.Array
  keep_idx: jax.Array
  F: jax.Array
  violation: jax.Array
  raw: jax.Array
  priority: jax.Array
  archive: Archive


@struct.dataclass
class Batch:
  """One generation's candidates: the genomes and the dense batch to evaluate.

  Attributes:
    choice: int32 ``[P, num_active]`` bit-choice indices of the ``P = population`` live
      candidates (species order).
    keep_idx: int32 ``[P]`` their keep-ratio indices.
    live: int32 ``[P]`` their flat slots in ``[S * C]`` (species-major).
    genomes: one genome pytree per species group (what the groups' ``tell`` receives).
  """
  choice: jax.Array
  keep_idx: jax.Array
  live: jax.Array
  genomes: tuple


@struct.dataclass
class Proposal:
  """What ``propose`` hands to ``select`` besides the batch.

  Attributes:
    species: the species groups' states after ``ask``.
    choice: int32 ``[S, C, num_active]`` decoded offspring, every slot.
    keep_idx: int32 ``[S, C]`` decoded offspring keep indices.
    key: uint32 PRNG key data left after this generation's splits.
  """
  species: tuple
  choice: jax.Array
  keep_idx: jax.Array
  key: jax.Array


@struct.dataclass
class GenerationMetrics:
  """Per-species numbers of one generation (``S`` species).

  Attributes:
    utility: float32 ``[S]`` raw utility (R2, lower is better; front count or
      hypervolume contribution, higher is better).
    value: float32 ``[S]`` utility mapped to [0, 1], higher is better (UCB input).
    sizes: int32 ``[S]`` the next generation's sizes.
    front_counts: int32 ``[S]`` candidates of each species on the joint first front.
  """
  utility: jax.Array
  value: jax.Array
  sizes: jax.Array
  front_counts: jax.Array


def species_capacity(cfg: EvolutionConfig) -> int:
  """Largest size a species can reach: population - (S-1) * min_species_size."""
  return cfg.population - (len(cfg.species) - 1) * cfg.min_species_size


def initial_sizes(cfg: EvolutionConfig) -> np.ndarray:
  s = len(cfg.species)
  sizes = np.full(s, cfg.population // s, np.int32)
  sizes[: cfg.population % s] += 1
  return sizes


UTILITY_HIGHER_IS_BETTER = {"r2": False, "front_count": True, "hv_contribution": True}
"""Direction of each raw utility (R2 is a distance to the utopian point: lower is better)."""

INT_MAX = np.iinfo(np.int32).max
"""Priority of a slot that holds no evaluated member."""


def normalise_utility(raw, higher_is_better: bool, norm: str = "ratio",
                      temperature: float = 1.0):
  """Maps raw species utilities to values in [0, 1], higher is better (UCB input).

  ``norm="ratio"`` (default): every utility is turned into a non-negative score ``q``
  (``q = u`` for front count / hypervolume contribution, ``q = 1 / u`` for R2) and
  ``value = (q / max q) ** (1 / temperature)``. The best species gets 1 and the others
  the fraction of its score they reach: scale-free, continuous in the utilities (close
  utilities give close values, so fitness noise moves the sizes a little), and
  ``temperature`` sharpens (< 1) or flattens (> 1) the contrast; it is a softmax over
  ``log q`` normalised by its maximum instead of its sum. ``norm="minmax"`` is the
  earlier ``(u - worst) / (best - worst)``: the worst species always gets 0 and the
  best 1 however close they are (degenerate under noise; kept for comparison).
  Non-finite utilities (a species with no evaluated member) get 0; if no species has a
  positive score every value is 1.

  Args:
    raw: float ``[S]`` raw utilities.
    higher_is_better: direction of ``raw``.
    norm: ``"ratio"`` or ``"minmax"``.
    temperature: > 0, only for ``"ratio"``.

  Returns:
    float32 ``[S]`` values in [0, 1].

  Raises:
    ValueError: ``norm`` is not one of ``("ratio", "minmax")``.
  """
  raw = jnp.asarray(raw, jnp.float32)
  finite = jnp.isfinite(raw)
  if norm == "minmax":
    u = raw if higher_is_better else -raw
    lo = jnp.min(jnp.where(finite, u, jnp.inf))
    hi = jnp.max(jnp.where(finite, u, -jnp.inf))
    value = jnp.where(hi - lo > 1e-12, (u - lo) / jnp.maximum(hi - lo, 1e-12), 1.0)
    return jnp.where(finite, value, 0.0)
  if norm != "ratio":
    raise ValueError(f"norm must be one of ('ratio', 'minmax'), got {norm!r}")
  if higher_is_better:
    q = jnp.maximum(raw, 0.0)
  else:
    q = 1.0 / jnp.maximum(raw, 1e-12)
  q = jnp.where(finite, q, 0.0)
  best = jnp.max(q)
  ratio = jnp.where(best > 0, q / jnp.where(best > 0, best, 1.0), 1.0)
  return jnp.where(finite | (best <= 0), ratio ** (1.0 / temperature), 0.0)


def allocate_sizes(value, evals, old_sizes, total: int, min_size: int, capacity: int,
                   ucb_c: float, max_growth: float | None = 2.0):
  """UCB1 allocation of ``total`` slots to species (jit-compatible).

  ``a_s = value_s + c * sqrt(ln(sum_y) / y_s)`` with ``value`` in [0, 1] (higher is
  better) and ``y_s`` the species' evaluation count. Every species gets
  ``min_size``; the remaining slots go one by one to the species with the largest
  ``a_s / (extra_s + 1)`` (D'Hondt apportionment, exact integer sum) among those
  still below their cap: ``capacity``, and with ``max_growth`` also
  ``floor(max_growth * old_size)`` (``None``: no growth cap, NEMO's Algorithm 1; slots
  beyond a species' evaluated candidates are filled with random offspring, see
  :func:`random_fill`).

  Returns:
    int32 sizes ``[S]`` summing to ``total``.
  """
  evals = jnp.maximum(evals.astype(jnp.float32), 1.0)
  score = value + ucb_c * jnp.sqrt(jnp.log(jnp.sum(evals)) / evals)
  score = jnp.maximum(score, 1e-6)
  cap = jnp.full_like(old_sizes, capacity)
  if max_growth is not None:
    grown = jnp.floor(max_growth * old_sizes.astype(jnp.float32)).astype(old_sizes.dtype)
    cap = jnp.minimum(cap, jnp.maximum(grown, min_size))
  sizes = jnp.full_like(old_sizes, min_size)

  def seat(_, sizes):
    quotient = jnp.where(sizes < cap, score / (sizes - min_size + 1.0), -jnp.inf)
    return sizes.at[jnp.argmax(quotient)].add(1)

  return jax.lax.fori_loop(0, total - min_size * old_sizes.shape[0], seat, sizes)


def random_fill(offspring, fresh, num_parents, species_axis_size: int):
  """Offspring slots ``j >= num_parents[s]`` of species ``s`` replaced by ``fresh`` genomes.

  Args:
    offspring: pytree of ``[S_g, C, ...]`` genomes (a GA group's ``ask`` output).
    fresh: pytree like ``offspring`` (random genomes, the group's ``fresh``).
    num_parents: int32 ``[S_g]`` evaluated parents per species.
    species_axis_size: ``C``.

  Returns:
    pytree like ``offspring``.
  """
  replace = jnp.arange(species_axis_size)[None, :] >= num_parents[:, None]

  def pick(o, f):
    return jnp.where(replace.reshape(replace.shape + (1,) * (o.ndim - 2)), f, o)

  return jax.tree.map(pick, offspring, fresh)


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


def update_archive(archive: Archive, rows: Archive) -> Archive:
  """Keeps every (feasible-first) non-dominated, distinct configuration seen.

  ``rows.valid`` marks real rows, ``key`` identifies a configuration (the first of
  equal keys wins). If more than the capacity are non-dominated, the most crowded ones
  are dropped.

  Args:
    archive: the current archive, ``A`` rows.
    rows: candidates to add, any number of rows.

  Returns:
    The new archive, ``A`` rows.
  """
  cap = archive.valid.shape[0]
  both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), archive, rows)
  finite = jnp.all(jnp.isfinite(both.F), axis=1)
  valid = _dedup(both.key, both.valid & finite)
  rank = pareto.constrained_rank(both.F, both.violation, valid=valid)
  keep = valid & (rank == 0)
  crowd = pareto.crowding_distance(both.F, jnp.where(keep, 0, 1), valid=keep)
  crowd = jnp.where(jnp.isfinite(crowd), crowd, jnp.finfo(jnp.float32).max)
  order = jnp.lexsort((jnp.arange(keep.shape[0]), -crowd, ~keep))[:cap]
  out = jax.tree.map(lambda x: x[order], both)
  return out.replace(valid=keep[order])


def empty_archive(size: int, num_active: int, num_objectives: int, num_raw: int) -> Archive:
  """An archive of ``size`` empty rows."""
  return Archive(key=jnp.full((size, num_active + 1), -1, jnp.int32),
                 choice=jnp.zeros((size, num_active), jnp.int32),
                 keep_idx=jnp.zeros((size,), jnp.int32),
                 F=jnp.full((size, num_objectives), jnp.nan, jnp.float32),
                 violation=jnp.zeros((size,), jnp.float32),
                 raw=jnp.full((size, num_raw), jnp.nan, jnp.float32),
                 species=jnp.full((size,), -1, jnp.int32),
                 generation=jnp.full((size,), -1, jnp.int32),
                 valid=jnp.zeros((size,), bool))


@dataclasses.dataclass
class Engine:
  """Builds the jitted ``init``, ``propose`` and ``select`` functions for one problem.

  Args:
    cfg: the validated search section.
    space: the species' decode space (``problem.SearchSpace``).
    graph: the workload ``jraph.GraphsTuple`` (GNN species input; ``graph.policy_graph``).
    feature_dim: node feature width.
    raw_names: names of the raw quantities stored per member (for reports).
    species_kinds: the species kinds the config names (``Registries.species``;
      default: the built-in kinds).
    num_objectives: ``M``, the number of (minimised) objectives.
    hv_ref: hypervolume reference point on the normalised objectives (None: all 1).
    guide: the problem's sensitivity guide (``search/guide.py``) for the species that use
      it, or None.
  """
  cfg: EvolutionConfig
  space: SearchSpace
  graph: Any
  feature_dim: int
  raw_names: tuple[str, ...]
  species_kinds: Mapping[str, SpeciesKind] | None = None
  num_objectives: int = 3
  hv_ref: tuple[float, ...] | None = None
  guide: Any = None

  def __post_init__(self):
    cfg = self.cfg
    kinds = species_lib.BUILTIN_SPECIES if self.species_kinds is None else self.species_kinds
    self.num_species = len(cfg.species)
    self.capacity = species_capacity(cfg)
    self.groups = species_lib.build_groups(cfg.species, self.space, self.capacity, self.graph,
                                           self.feature_dim, kinds,
                                           init_sizes=initial_sizes(cfg), guide=self.guide)
    order = [i for g in self.groups for i in g.species]
    self._species_perm = np.argsort(np.asarray(order))
    m = self.num_objectives
    self.ref = jnp.asarray(pareto.reference_point(self.hv_ref, m), jnp.float32)
    self.ref_dirs = jnp.asarray(pareto.uniform_weights(m, cfg.r2_partitions), jnp.float32)
    self.propose = jax.jit(self._propose)
    self.select = jax.jit(self._select)
    self.init_state = jax.jit(self._init_state)
    self.finish_init = jax.jit(self._finish_init)

  def precompile(self) -> None:
    """Compiles ``propose`` and ``select`` for this engine's shapes, ahead of their use.

    The state between generations has one fixed shape (canonical, strong dtypes: the
    driver's ``_canonical``), known before generation 0 is scored, so the search loop
    calls this beside generation 0's evaluation and generation 1 compiles nothing. The
    executables replace ``propose`` / ``select``; called with other shapes they raise.
    """
    strong = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    P, M, R = self.cfg.population, self.num_objectives, len(self.raw_names)
    F = jax.ShapeDtypeStruct((P, M), jnp.float32)
    violation = jax.ShapeDtypeStruct((P,), jnp.float32)
    raw = jax.ShapeDtypeStruct((P, R), jnp.float32)
    state0, batch0 = jax.eval_shape(self._init_state, jax.random.key(0))
    state = strong(jax.eval_shape(self._finish_init, state0, batch0, F, violation, raw))
    proposal, batch = jax.eval_shape(self._propose, state)
    self.propose = jax.jit(self._propose).lower(state).compile()
    self.select = jax.jit(self._select).lower(state, strong(proposal), strong(batch), F,
                                              violation, raw).compile()

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

  def _batch(self, choice, keep_idx, live, genomes) -> Batch:
    s, c = self.num_species, self.capacity
    return Batch(choice=choice.reshape(s * c, -1)[live], keep_idx=keep_idx.reshape(-1)[live],
                 live=live, genomes=tuple(genomes))

  def _rank_and_priority(self, F, violation, valid):
    """Joint constrained ranks and the selection order of candidates of ALL species.

    The order is NSGA-III's (or NSGA-II's) total order for ``k = population``
    survivors: the candidates with priority < population are exactly the NSGA-III
    survivors of the pooled candidates, and the rest continue the same niching, so
    each species can fill its own allocation with its best-ranked members.

    Args:
      F: [N, M] objectives; violation: [N]; valid: bool [N].

    Returns:
      ``(priority int32 [N], 0 = best, int32 max where not valid; rank int32 [N])``.
    """
    rank = pareto.constrained_rank(F, violation, valid=valid)
    if self.cfg.selection == "nsga2":
      priority = pareto.nsga2_priority(F, valid=valid, violation=violation)
    else:
      priority = pareto.nsga3_priority(F, self.cfg.population, self.ref_dirs, valid=valid,
                                       violation=violation)
    return jnp.where(valid, priority, jnp.iinfo(jnp.int32).max), rank

  def member_key(self, choice, keep_idx):
    return jnp.concatenate([choice, keep_idx[..., None]], axis=-1).astype(jnp.int32)

  def _scatter(self, live, values, fill):
    s, c = self.num_species, self.capacity
    flat = jnp.full((s * c,) + values.shape[1:], fill, values.dtype).at[live].set(values)
    return flat.reshape((s, c) + values.shape[1:])

  def _archive_rows(self, batch: Batch, F, violation, raw, generation) -> Archive:
    species_id = jnp.repeat(jnp.arange(self.num_species), self.capacity)[batch.live]
    n = batch.choice.shape[0]
    return Archive(key=self.member_key(batch.choice, batch.keep_idx), choice=batch.choice,
                   keep_idx=batch.keep_idx, F=F, violation=violation, raw=raw,
                   species=species_id.astype(jnp.int32),
                   generation=jnp.full((n,), generation, jnp.int32),
                   valid=jnp.ones((n,), bool))

  def _tell(self, key_data, states, offspring, keep_order, F, violation, alive):
    """Every group's ``tell`` with its slice of the generation's outcome.

    Args:
      key_data: the generation's key data; group ``gi`` gets ``fold_in(key, 1000 + gi)``.
      states: per-group states (after ``ask``).
      offspring: per-group genomes that were evaluated.
      keep_order: int32 ``[S, C]`` what each species keeps (indices into ``[0, 2C)``).
      F, violation, alive: the offspring's ``[S, C, M]``, ``[S, C]``, ``[S, C]``.

    Returns:
      tuple of the groups' next states.
    """
    key = jax.random.wrap_key_data(key_data)
    out = []
    for gi, (g, st, off) in enumerate(zip(self.groups, states, offspring)):
      idx = np.asarray(g.species)
      info = species_lib.TellInfo(keep_order=keep_order[idx], F=F[idx],
                                  violation=violation[idx], alive=alive[idx])
      out.append(g.tell(jax.random.fold_in(key, 1000 + gi), st, off, info))
    return tuple(out)

  # ---------------------------------------------------------------- generation 0
  def _init_state(self, key) -> tuple[SearchState, Batch]:
    """Every group's ``init``; returns (state, batch to evaluate)."""
    cfg = self.cfg
    key, *gkeys = jax.random.split(key, len(self.groups) + 1)
    states, genomes = zip(*[g.init(k) for g, k in zip(self.groups, gkeys)])
    sizes = jnp.asarray(initial_sizes(cfg))
    choice, keep_idx = self._decode_all(genomes)
    live = self._gather_live(sizes)
    s, c, m, r = self.num_species, self.capacity, self.num_objectives, len(self.raw_names)
    state = SearchState(
        generation=jnp.zeros((), jnp.int32),
        key=jax.random.key_data(key),
        species=tuple(states),
        sizes=sizes,
        evals=jnp.zeros((s,), jnp.int32),
        choice=choice,
        keep_idx=keep_idx,
        F=jnp.full((s, c, m), jnp.nan, jnp.float32),
        violation=jnp.zeros((s, c), jnp.float32),
        raw=jnp.full((s, c, r), jnp.nan, jnp.float32),
        priority=jnp.zeros((s, c), jnp.int32),
        archive=empty_archive(cfg.archive_size, len(self.space.active_nodes), m, r))
    return state, self._batch(choice, keep_idx, live, genomes)

  def _finish_init(self, state: SearchState, batch: Batch, F, violation, raw) -> SearchState:
    """Stores generation 0's scores, ranks the members, tells every group, fills the archive.

    Generation 0 goes through the same ``tell`` as later ones: every member is kept
    (the identity keep order over the members, which are the offspring).
    """
    live = batch.live
    s, c = self.num_species, self.capacity
    F_all = self._scatter(live, F, jnp.nan)
    viol_all = self._scatter(live, violation, 0.0)
    alive = self._alive(state.sizes)
    pri, _ = self._rank_and_priority(F_all.reshape(s * c, -1), viol_all.reshape(-1),
                                     alive.reshape(-1))
    identity = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (s, c))
    return state.replace(
        F=F_all,
        violation=viol_all,
        raw=self._scatter(live, raw, jnp.nan),
        priority=pri.reshape(s, c),
        evals=state.sizes,
        species=self._tell(state.key, state.species, batch.genomes, identity, F_all,
                           viol_all, alive),
        archive=update_archive(state.archive,
                               self._archive_rows(batch, F, violation, raw, 0)))

  # ---------------------------------------------------------------- generations >= 1
  def _propose(self, state: SearchState) -> tuple[Proposal, Batch]:
    """Every group's ``ask``: offspring of every species and the dense batch of live ones.

    A group varies its evaluated parents (``ask`` sees their number as the sizes); the
    slots of a species beyond them (grown past its evaluated candidates) get random
    offspring from the group's ``fresh`` (groups without one: more offspring of the
    parents; evosax groups sample every slot from their own distribution).
    """
    key = jax.random.wrap_key_data(state.key)
    key, *gkeys = jax.random.split(key, len(self.groups) + 1)
    num_parents = jnp.sum(self._alive(state.sizes) & (state.priority < INT_MAX), axis=1)
    num_parents = jnp.maximum(num_parents, 1).astype(jnp.int32)
    offspring, asked = [], []
    for g, k, st in zip(self.groups, gkeys, state.species):
      idx = np.asarray(g.species)
      x, st = g.ask(k, st, state.priority[idx], num_parents[idx])
      if g.fresh is not None:
        x = jax.lax.cond(jnp.any(num_parents[idx] < state.sizes[idx]),
                         lambda x: random_fill(x, g.fresh(jax.random.fold_in(k, 7)),
                                               num_parents[idx], self.capacity),
                         lambda x: x, x)
      offspring.append(x)
      asked.append(st)
    choice, keep_idx = self._decode_all(offspring)
    live = self._gather_live(state.sizes)
    proposal = Proposal(species=tuple(asked), choice=choice, keep_idx=keep_idx,
                        key=jax.random.key_data(key))
    return proposal, self._batch(choice, keep_idx, live, offspring)

  def _utilities(self, F, valid, rank, violation):
    """Per-species value in [0, 1] (higher is better) and the raw utility.

    ``r2``: R2 of the species' candidates against the utopian point (lower is better);
    ``front_count``: its candidates on the joint first front; ``hv_contribution``: the
    hypervolume of all feasible candidates minus that without the species' (its
    exclusive share; overlapping regions count for nobody). Values by
    :func:`normalise_utility` (``utility_norm``, ``utility_temperature``).
    """
    cfg = self.cfg
    if cfg.utility == "front_count":
      raw = jnp.sum(valid & (rank == 0), axis=1).astype(jnp.float32)
    elif cfg.utility == "hv_contribution":
      ok = valid & (violation <= 0)
      ref = self.ref
      flat_F = F.reshape(-1, F.shape[-1])
      total = pareto.hypervolume(flat_F, ref, valid=ok.reshape(-1))
      owner = jnp.repeat(jnp.arange(F.shape[0]), F.shape[1])
      raw = jnp.stack([total - pareto.hypervolume(flat_F, ref, valid=ok.reshape(-1) & (owner != i))
                       for i in range(F.shape[0])]).astype(jnp.float32)
      raw = jnp.maximum(raw, 0.0)
    else:
      utopia = jnp.zeros((F.shape[-1],), jnp.float32)
      raw = jax.vmap(lambda f, v: pareto.r2_indicator(f, utopia, self.ref_dirs, valid=v))(
          F, valid)
    value = normalise_utility(raw, UTILITY_HIGHER_IS_BETTER[cfg.utility], cfg.utility_norm,
                              cfg.utility_temperature)
    return value, raw

  def _select(self, state: SearchState, proposal: Proposal, batch: Batch, F_new, viol_new,
              raw_new) -> tuple[SearchState, GenerationMetrics]:
    """Joint ranking, resizing, every group's ``tell`` and the archive update."""
    cfg = self.cfg
    s, c = self.num_species, self.capacity
    live = batch.live
    off_F = self._scatter(live, F_new, jnp.nan)
    off_viol = self._scatter(live, viol_new, 0.0)
    off_raw = self._scatter(live, raw_new, jnp.nan)
    alive = self._alive(state.sizes)
    # Evaluated parents: slots filled by random offspring hold no evaluated member.
    parent_ok = alive & (state.priority < INT_MAX)
    # Candidates of species s: its parents then its offspring, [S, 2C].
    cand_F = jnp.concatenate([state.F, off_F], axis=1)
    cand_viol = jnp.concatenate([state.violation, off_viol], axis=1)
    cand_raw = jnp.concatenate([state.raw, off_raw], axis=1)
    cand_choice = jnp.concatenate([state.choice, proposal.choice], axis=1)
    cand_keep = jnp.concatenate([state.keep_idx, proposal.keep_idx], axis=1)
    cand_valid = jnp.concatenate([parent_ok, alive], axis=1)
    flat_valid = cand_valid.reshape(-1)
    priority, rank = self._rank_and_priority(cand_F.reshape(s * 2 * c, -1),
                                             cand_viol.reshape(-1), flat_valid)
    priority = priority.reshape(s, 2 * c)
    rank = rank.reshape(s, 2 * c)
    finite = cand_valid & jnp.all(jnp.isfinite(cand_F), axis=-1)
    value, utility = self._utilities(cand_F, finite, rank, cand_viol)
    evals = state.evals + state.sizes
    if cfg.resize:
      sizes = allocate_sizes(value, evals, state.sizes, cfg.population,
                             cfg.min_species_size, c, cfg.ucb_c, cfg.max_growth)
    else:
      sizes = state.sizes
    # Fill: every species keeps its best-ranked candidates; slots beyond its evaluated
    # candidates hold no member (priority INT_MAX) and get random offspring next.
    keep_order = jnp.argsort(priority, axis=1, stable=True)[:, :c]      # [S, C]
    take = lambda x: jnp.take_along_axis(x, keep_order.reshape(keep_order.shape + (1,) * (x.ndim - 2)), axis=1)
    new_alive = self._alive(sizes)
    new_priority = jnp.take_along_axis(priority, keep_order, axis=1)
    new_state = SearchState(
        generation=state.generation + 1,
        key=proposal.key,
        species=self._tell(proposal.key, proposal.species, batch.genomes, keep_order, off_F,
                           off_viol, alive),
        sizes=sizes,
        evals=evals,
        choice=take(cand_choice),
        keep_idx=take(cand_keep[..., None])[..., 0],
        F=jnp.where(new_alive[..., None], take(cand_F), jnp.nan),
        violation=take(cand_viol[..., None])[..., 0],
        raw=take(cand_raw),
        priority=jnp.where(new_alive, new_priority, INT_MAX),
        archive=update_archive(state.archive, self._archive_rows(
            batch, F_new, viol_new, raw_new, state.generation + 1)))
    metrics = GenerationMetrics(utility=utility, value=value, sizes=sizes,
                                front_counts=jnp.sum(finite & (rank == 0), axis=1))
    return new_state, metrics

  def hypervolume(self, archive: Archive):
    """Hypervolume (reference ``hv_ref``) of the feasible archive front on the normalised
    objectives."""
    ok = archive.valid & (archive.violation <= 0)
    return pareto.hypervolume(archive.F, self.ref, valid=ok)
