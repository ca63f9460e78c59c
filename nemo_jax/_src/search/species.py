"""Species: every species group behind one evosax-style init/ask/tell protocol.

Species that share a structure form a *group* whose genomes are stacked on a leading
species axis ``[S_g, C, ...]`` (``C`` = per-species capacity) so that initialisation,
variation and decoding run as one call vmapped over species and members:

* ``direct``: direct encodings (``direct_round``, ``direct_floor``, ``random``) with
  one real gene per searched quantizer (plus one keep gene when several keep ratios
  are searched), all in index space ``[0, K-1]``;
* ``gcn`` / ``graph_unet`` (one group per hidden width): GNN policy weights; the
  genome also carries ``keep_logits`` when several keep ratios are searched;
* every evosax-driven species is a group of its own (its strategy owns its state).

Every group is a :class:`SpeciesGroup` of pure functions with explicit keys and state,
as an evosax strategy: ``init`` -> ``ask`` (offspring) -> the engine evaluates and ranks
-> ``tell`` (next state). The genetic-algorithm groups (SBX + polynomial mutation, SSNE)
are wrapped by :func:`ga_group`: their state is the parent genomes, ``ask`` varies them
and ``tell`` keeps the best-ranked of parents + offspring. evosax groups wrap the
strategy's own init/ask/tell on a Tchebycheff-scalarised fitness.

A species' live members are the first ``size`` slots of its capacity; the rest are
ignored padding, so shapes never change between generations.
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nemo_jax._src.problem.space import SearchSpace
from nemo_jax._src.search import operators as ops
from nemo_jax._src.search import policies
from nemo_jax._src.search.guide import SearchGuide
from nemo_jax._src.search.config import (DirectParams, GNNParams, GraphUNetParams,
                                         SpeciesConfig, SpeciesKind)

ROUNDING = {"direct_round": 0, "direct_floor": 1, "random": 0}
BIG = 1e6  # finite "very bad" fitness for evosax (NaN-free fitness shaping)


class TellInfo(NamedTuple):
  """What a group's ``tell`` learns about one generation (slices for the group's species).

  Attributes:
    keep_order: int32 ``[S_g, C]`` indices into parents ++ offspring (``[0, 2C)``), best
      first: the joint ranking over all species decides which candidates each species
      keeps (GA groups take them; generation 0 passes the identity ``arange(C)``).
    F: float32 ``[S_g, C, M]`` objectives of the offspring (NaN where not evaluated).
    violation: float32 ``[S_g, C]`` total constraint violation of the offspring.
    alive: bool ``[S_g, C]`` offspring that were evaluated (the first ``size`` slots).
  """
  keep_order: jax.Array
  F: jax.Array
  violation: jax.Array
  alive: jax.Array


class SpeciesGroup(NamedTuple):
  """Species sharing one genome structure, as pure evosax-style functions.

  ``genomes`` is a pytree the group's ``decode`` understands (GA groups stack them
  ``[S_g, C, ...]``; an evosax group keeps its strategy's ``[population, ...]``), and
  ``state`` whatever the group carries between generations.

  Attributes:
    family: label of the group (``"direct"``, ``"gcn"``, ``"evosax:Open_ES"``, ...).
    species: indices (into the config's species list) of the group's members.
    init: ``init(key) -> (state, genomes)``: generation 0's state and the genomes to
      evaluate.
    ask: ``ask(key, state, priority, sizes) -> (offspring, state)`` with ``priority``
      int32 ``[S_g, C]`` (the joint rank of the current members, lower is better, only
      the first ``sizes[s]`` slots are live) and ``sizes`` int32 ``[S_g]``; ``offspring``
      are genomes filling the whole capacity.
    tell: ``tell(key, state, offspring, info: TellInfo) -> state``, after the offspring
      were evaluated.
    decode: ``decode(genomes) -> (choice_idx int32 [S_g, C, num_active], keep_idx int32
      [S_g, C])``: indices into the config's ``bit_choices`` for ``space.active_nodes``
      and into its ``keep_choices``.
    fresh: optional ``fresh(key) -> genomes`` like ``ask``'s offspring: random genomes
      the engine puts into the slots a species grew past its evaluated candidates
      (NEMO's "remaining slots get random offspring"). ``None``: those slots keep the
      group's own offspring (``ask`` always fills the whole capacity).
  """
  family: str
  species: tuple[int, ...]
  init: Callable
  ask: Callable
  tell: Callable
  decode: Callable
  fresh: Callable | None = None


def keep_best(parents, offspring, keep_order):
  """The members a GA species keeps: ``(parents ++ offspring)[keep_order]`` per species.

  Args:
    parents: pytree of ``[S_g, C, ...]`` genomes.
    offspring: pytree like ``parents``.
    keep_order: int32 ``[S_g, C]`` indices into the concatenation (``[0, 2C)``).

  Returns:
    pytree like ``parents``.
  """
  def take(p, o):
    both = jnp.concatenate([p, o], axis=1)
    idx = keep_order.reshape(keep_order.shape + (1,) * (both.ndim - 2))
    return jnp.take_along_axis(both, idx, axis=1)

  return jax.tree.map(take, parents, offspring)


def ga_group(family: str, species: tuple[int, ...], init: Callable, vary: Callable,
             decode: Callable, fresh: Callable | None = None) -> SpeciesGroup:
  """Wraps plain genetic-algorithm functions as a :class:`SpeciesGroup`.

  The group's state is its parent genomes; ``ask`` varies them and leaves the state as
  it is, ``tell`` keeps the best-ranked of parents + offspring (``info.keep_order``).

  Args:
    family: group label.
    species: indices of the group's species in the config.
    init: ``init(key) -> genomes [S_g, C, ...]``.
    vary: ``vary(key, parents, priority int32 [S_g, C], sizes int32 [S_g]) -> offspring
      [S_g, C, ...]`` (pick parents among the first ``sizes[s]`` members, lower priority
      is better).
    decode: ``decode(genomes) -> (choice_idx [S_g, C, num_active], keep_idx [S_g, C])``.
    fresh: ``fresh(key) -> genomes [S_g, C, ...]``, random genomes for the random fill
      of grown species (default: ``init``).

  Returns:
    The SpeciesGroup.
  """
  def init_state(key):
    genomes = init(key)
    return genomes, genomes

  def ask(key, parents, priority, sizes):
    return vary(key, parents, priority, sizes), parents

  def tell(key, parents, offspring, info: TellInfo):
    del key  # keeping the best-ranked members is deterministic
    return keep_best(parents, offspring, info.keep_order)

  return SpeciesGroup(family, tuple(species), init_state, ask, tell, decode,
                      init if fresh is None else fresh)


def _tournament_parents(key, priority, size, num):
  """Binary tournament among the first ``size`` members (lower priority wins)."""
  return ops.tournament_select(key, priority, num, valid=jnp.arange(priority.shape[0]) < size)


def uniform_seed_genes(num_seeds: int, num_active: int, num_genes: int, num_choices: int,
                       num_keep: int):
  """Genes of ``num_seeds`` uniform-precision members (every searched quantizer alike).

  Member ``j`` gets bit choice ``round(j (K - 1) / (num_seeds - 1))`` on every searched
  quantizer (the choices spread from the lowest to the highest; one seed: the highest)
  and the largest keep ratio.

  Args:
    num_seeds: members to seed (at most ``num_choices`` distinct ones are useful).
    num_active: searched quantizers; num_genes: genes per member (+1 keep gene).
    num_choices: bit choices ``K``; num_keep: keep choices.

  Returns:
    float32 ``[num_seeds, num_genes]`` in index space.
  """
  if num_seeds == 1:
    levels = jnp.full((1,), num_choices - 1.0)
  else:
    levels = jnp.round(jnp.arange(num_seeds) * (num_choices - 1.0) / (num_seeds - 1))
  genes = jnp.broadcast_to(levels[:, None], (num_seeds, num_active))
  if num_genes > num_active:
    genes = jnp.concatenate([genes, jnp.full((num_seeds, 1), num_keep - 1.0)], axis=1)
  return genes.astype(jnp.float32)


def seed_rows(space: SearchSpace, specs: Sequence[SpeciesConfig], sizes: Sequence[int],
              guide: SearchGuide | None = None) -> list[np.ndarray]:
  """The seeded generation-0 members of direct species, distinct across the species.

  The uniform-precision configurations (``seed_uniform``: :func:`uniform_seed_genes`,
  ``min(K, sum of the seeded species' sizes)`` levels spread from the lowest to the
  highest choice) are dealt round-robin to the ``seed_uniform`` species, then rows of the
  greedy sensitivity frontier (``seed_greedy``: ``SearchGuide.spread``, evenly spaced in
  cost, rows equal to a uniform seed dropped) to the ``seed_greedy`` species; each
  species takes at most its size. So no two species start with the same configuration
  (no evaluation of generation 0 is a duplicate).

  Returns:
    Per species float32 ``[m_s, num_genes]`` genes in index space (``m_s`` may be 0).
  """
  n_active, genes = len(space.active_nodes), space.num_genes
  out = [[] for _ in specs]
  taken: set[bytes] = set()

  def deal(flag: str, rows: np.ndarray):
    who = [i for i, s in enumerate(specs) if getattr(s.params, flag, False)]
    turn = 0
    for row in rows:
      if row.tobytes() in taken:
        continue
      for _ in range(len(who)):
        i = who[turn % len(who)]
        turn += 1
        if len(out[i]) < sizes[i]:
          out[i].append(row)
          taken.add(row.tobytes())
          break

  if any(getattr(s.params, "seed_uniform", False) for s in specs):
    total = sum(n for s, n in zip(specs, sizes) if s.params.seed_uniform)
    deal("seed_uniform", np.asarray(uniform_seed_genes(
        min(space.num_choices, total), n_active, genes, space.num_choices, space.num_keep)))
  if any(getattr(s.params, "seed_greedy", False) for s in specs):
    if guide is None:
      raise ValueError("seed_greedy: the search has no sensitivity guide; allowed: a run "
                       "that computes the problem's sensitivity (run/search.py)")
    total = sum(n for s, n in zip(specs, sizes) if s.params.seed_greedy)
    rows = guide.spread(total).astype(np.float32)
    if genes > n_active:
      rows = np.concatenate([rows, np.full((len(rows), 1), space.num_keep - 1.0, np.float32)],
                            axis=1)
    deal("seed_greedy", rows)
  return [np.asarray(r, np.float32).reshape(-1, genes) for r in out]


def _direct_group(space: SearchSpace, specs: list[SpeciesConfig], idx: tuple[int, ...],
                  capacity: int, init_sizes=None, guide: SearchGuide | None = None
                  ) -> SpeciesGroup:
  """SBX + polynomial mutation on index-space genes ``[S_g, C, num_genes]``.

  A species with ``seed_uniform`` / ``seed_greedy`` starts with the members
  :func:`seed_rows` deals it (``size_0`` its generation-0 size from ``init_sizes``,
  default ``capacity``), the rest random; with ``sensitivity_mutation`` its polynomial
  mutation moves insensitive genes more often (``SearchGuide.mutation_weights``, mean
  rate still ``1 / genes``).
  """
  genes = space.num_genes
  high = jnp.concatenate([jnp.full((len(space.active_nodes),), space.num_choices - 1.0),
                          jnp.full((genes - len(space.active_nodes),), space.num_keep - 1.0)])
  low = jnp.zeros_like(high)
  floor_mode = jnp.asarray([ROUNDING[s.kind] for s in specs], jnp.int32)
  is_random = jnp.asarray([s.kind == "random" for s in specs])
  sbx_eta = jnp.asarray([s.params.sbx_eta for s in specs], jnp.float32)
  sbx_prob = jnp.asarray([s.params.sbx_prob for s in specs], jnp.float32)
  pm_eta = jnp.asarray([s.params.pm_eta for s in specs], jnp.float32)

  def init_one(key):
    return jax.random.uniform(key, (capacity, genes), minval=low, maxval=high)

  def fresh(key):
    return jax.vmap(init_one)(jax.random.split(key, len(specs)))

  seeded = None
  if any(s.params.seed_uniform or s.params.seed_greedy for s in specs):
    sizes = [min(capacity, capacity if init_sizes is None else int(init_sizes[i]))
             for i in idx]
    rows = []
    for dealt in seed_rows(space, specs, sizes, guide):
      row = np.full((capacity, genes), np.nan, np.float32)
      row[:len(dealt)] = dealt
      rows.append(row)
    seeded = jnp.asarray(np.stack(rows))
  # Per-gene mutation probability ([S_g, genes]): 1 / genes, or weighted by sensitivity.
  if any(s.params.sensitivity_mutation for s in specs) and guide is None:
    raise ValueError("sensitivity_mutation: the search has no sensitivity guide; allowed: a "
                     "run that computes the problem's sensitivity (run/search.py)")
  uniform_rate = np.full(genes, 1.0 / genes, np.float32)
  pm_prob = jnp.asarray(np.stack([
      np.minimum(1.0, uniform_rate * np.concatenate(
          [guide.mutation_weights(), np.ones(genes - len(space.active_nodes), np.float32)]))
      if s.params.sensitivity_mutation else uniform_rate for s in specs]))

  def init(key):
    random_genes = fresh(key)
    if seeded is None:
      return random_genes
    return jnp.where(jnp.isnan(seeded), random_genes, seeded)

  def decode_one(g, floor):
    # Floor-rounding biases toward compression (the top choice needs gene == high).
    idx_ = jnp.where(floor == 1, ops.decode_floor(g, low, high), ops.decode_round(g, low, high))
    idx_ = idx_.astype(jnp.int32)
    n = len(space.active_nodes)
    keep = idx_[..., n] if genes > n else jnp.zeros(g.shape[:-1], jnp.int32)
    return idx_[..., :n], keep

  def decode(genomes):
    return jax.vmap(decode_one)(genomes, floor_mode)

  def vary_one(key, parents, priority, size, eta_c, p_c, eta_m, rnd, p_m):
    k_sel, k_x, k_m, k_r = jax.random.split(key, 4)
    half = (capacity + 1) // 2
    pick = _tournament_parents(k_sel, priority, size, 2 * half)
    a, b = parents[pick[:half]], parents[pick[half:]]
    c1, c2 = ops.sbx_crossover(k_x, a, b, low, high, eta=eta_c, prob=p_c)
    children = jnp.concatenate([c1, c2])[:capacity]
    children = ops.polynomial_mutation(k_m, children, low, high, eta=eta_m, prob=p_m)
    fresh = init_one(k_r)
    return jnp.where(rnd, fresh, children)

  def vary(key, genomes, priority, sizes):
    keys = jax.random.split(key, len(specs))
    return jax.vmap(vary_one)(keys, genomes, priority, sizes, sbx_eta, sbx_prob, pm_eta,
                              is_random, pm_prob)

  return ga_group("direct", idx, init, vary, decode, fresh)


def _gnn_policy(spec: SpeciesConfig, num_choices: int):
  p = spec.params
  if isinstance(p, GraphUNetParams):
    return policies.graph_unet_policy(hidden=p.hidden, n_choices=num_choices, depth=p.depth,
                                      pool_ratio=p.pool_ratio, heads=p.heads,
                                      output_selu=p.output_selu)
  return policies.gcn_policy(hidden=p.hidden, n_choices=num_choices, heads=p.heads,
                             output_selu=p.output_selu)


def gnn_structure(spec: SpeciesConfig) -> tuple:
  """What GNN species must share to be stacked in one group (same parameter shapes)."""
  p = spec.params
  return (spec.kind, p.hidden, p.heads, getattr(p, "depth", 1), getattr(p, "pool_ratio", 0.5),
          p.output_selu)


def _gnn_group(space: SearchSpace, specs: list[SpeciesConfig], idx: tuple[int, ...],
               capacity: int, graph, feature_dim: int) -> SpeciesGroup:
  """SSNE on GNN policy weights (genomes ``[S_g, C]`` pytrees)."""
  policy = _gnn_policy(specs[0], space.num_choices)
  active = jnp.asarray(space.active_nodes, jnp.int32)
  mut_prob = jnp.asarray([s.params.mutation_prob for s in specs], jnp.float32)
  mut_strength = jnp.asarray([s.params.mutation_strength for s in specs], jnp.float32)
  cx_prob = jnp.asarray([s.params.crossover_prob for s in specs], jnp.float32)

  def init_member(key):
    k_p, k_k = jax.random.split(key)
    genome = {"policy": policy.init(k_p, feature_dim)}
    if space.num_keep > 1:
      genome["keep_logits"] = 0.1 * jax.random.normal(k_k, (space.num_keep,))
    return genome

  def init(key):
    keys = jax.random.split(key, len(specs) * capacity).reshape(len(specs), capacity)
    return jax.vmap(jax.vmap(init_member))(keys)

  def decode_member(genome):
    logits = policy.apply(genome["policy"], graph)
    choice = jnp.argmax(logits[active], axis=-1).astype(jnp.int32)
    keep = (jnp.argmax(genome["keep_logits"]).astype(jnp.int32) if space.num_keep > 1
            else jnp.zeros((), jnp.int32))
    return choice, keep

  def decode(genomes):
    return jax.vmap(jax.vmap(decode_member))(genomes)

  def vary_one(key, parents, priority, size, p_mut, s_mut, p_cx):
    k_sel, k_x, k_c, k_m = jax.random.split(key, 4)
    pick = _tournament_parents(k_sel, priority, size, 2 * capacity)
    pa = jax.tree.map(lambda x: x[pick[:capacity]], parents)
    pb = jax.tree.map(lambda x: x[pick[capacity:]], parents)
    crossed = jax.vmap(ops.ssne_crossover)(jax.random.split(k_x, capacity), pa, pb)[0]
    do_cx = jax.random.uniform(k_c, (capacity,)) < p_cx
    children = jax.tree.map(
        lambda c, a: jnp.where(do_cx.reshape((-1,) + (1,) * (a.ndim - 1)), c, a), crossed, pa)
    return jax.vmap(lambda k, g: ops.ssne_mutate(k, g, mut_prob=p_mut, mut_strength=s_mut))(
        jax.random.split(k_m, capacity), children)

  def vary(key, genomes, priority, sizes):
    keys = jax.random.split(key, len(specs))
    return jax.vmap(vary_one)(keys, genomes, priority, sizes, mut_prob, mut_strength, cx_prob)

  return ga_group(specs[0].kind, idx, init, vary, decode)


def tchebycheff(F, weights=None):
  """Scalarised fitness for evosax species: weighted max distance to the utopian point 0.

  Args:
    F: objectives ``[..., M]`` (minimised).
    weights: optional ``[M]`` weights (default: uniform ``1 / M``).

  Returns:
    ``[...]`` fitness, lower is better.
  """
  m = F.shape[-1]
  w = jnp.full((m,), 1.0 / m) if weights is None else weights
  return jnp.max(w * F, axis=-1)


def evosax_fitness(info: TellInfo, population_size: int):
  """Fitness of an evosax species' population from its offspring scores.

  Tchebycheff scalarisation plus ``10 x`` the constraint violation; members that were
  not evaluated (dead or padding beyond the capacity) or scored non-finite get
  :data:`BIG`, so evosax's fitness shaping never meets a NaN.

  Args:
    info: the species' TellInfo (``S_g = 1``).
    population_size: the strategy's population (>= C).

  Returns:
    float32 ``[population_size]``.
  """
  fit = tchebycheff(info.F[0]) + 10.0 * info.violation[0]
  fit = jnp.where(info.alive[0] & jnp.isfinite(fit), fit, BIG)
  return jnp.concatenate([fit, jnp.full((population_size - fit.shape[0],), BIG)])


def _evosax_group(space: SearchSpace, spec: SpeciesConfig, i: int, capacity: int,
                  graph, feature_dim: int) -> SpeciesGroup:
  """A species driven by an evosax strategy (minimising a scalarised fitness).

  Its state is the strategy's state; its genomes the strategy's population
  ``[P, ...]`` (``P`` = C rounded up to even; decode uses the first C).
  """
  name = spec.evosax_name
  is_gnn = isinstance(spec.params, GNNParams)
  if is_gnn:
    base = _gnn_group(space, [spec], (i,), 1, graph, feature_dim)
    template = jax.tree.map(lambda x: x[0, 0], base.init(jax.random.key(0))[1])

    def to_choices(genomes):  # [1, C, ...] -> decode
      return base.decode(genomes)
  else:
    base = _direct_group(space, [spec], (i,), 1)
    template = jnp.zeros((space.num_genes,), jnp.float32)
    to_choices = base.decode
  # evosax is imported lazily: importing it runs a JAX computation, after which
  # jax.distributed.initialize (multi-host evaluation) can no longer be called.
  import evosax.algorithms
  cls = getattr(evosax.algorithms, name)
  pop = capacity + (capacity % 2)  # Open_ES's antithetic sampling needs an even size
  kwargs = {}
  if name in ("Open_ES", "SimpleGA"):
    kwargs["std_schedule"] = optax.constant_schedule(spec.params.sigma_init)
  if name == "Open_ES":
    kwargs["optimizer"] = optax.adam(0.05)
  strategy = cls(population_size=pop, solution=template, **kwargs)
  params = strategy.default_params
  if hasattr(params, "std_init"):
    params = params.replace(std_init=jnp.asarray(spec.params.sigma_init, jnp.float32))

  def init_strategy(key):
    k_init, k_pop = jax.random.split(key)
    if is_gnn:
      sample = jax.vmap(lambda k: base.init(k)[1])(jax.random.split(k_pop, pop))
      population = jax.tree.map(lambda x: x[:, 0, 0], sample)
    else:
      population = jax.random.uniform(k_pop, (pop, space.num_genes), maxval=1.0) * (
          jnp.asarray([space.num_choices - 1.0] * len(space.active_nodes)
                      + [space.num_keep - 1.0] * (space.num_genes - len(space.active_nodes))))
    if isinstance(strategy, evosax.algorithms.population_based.base.PopulationBasedAlgorithm):
      return strategy.init(k_init, population, jnp.full((pop,), jnp.inf), params)
    mean = jax.tree.map(lambda x: x.mean(0), population)
    return strategy.init(k_init, mean, params)

  def init(key):
    # Generation 0's population is the strategy's first ask.
    k_init, k_ask = jax.random.split(key)
    population, state = strategy.ask(k_ask, init_strategy(k_init), params)
    return state, population

  def ask(key, state, priority, sizes):
    del priority, sizes  # the strategy samples from its own distribution/population
    return strategy.ask(key, state, params)

  def tell(key, state, offspring, info: TellInfo):
    return strategy.tell(key, offspring, evosax_fitness(info, pop), state, params)[0]

  def decode(genomes):
    return to_choices(jax.tree.map(lambda x: x[None, :capacity], genomes))

  return SpeciesGroup(f"evosax:{name}", (i,), init, ask, tell, decode)


GroupBuilder = Callable[..., SpeciesGroup]
"""A species kind's builder: ``builder(space, specs, species_indices, capacity, graph,
feature_dim) -> SpeciesGroup`` for the species of one group (``specs``, at
``species_indices`` in the config), with genomes stacked ``[len(specs), capacity, ...]``;
``spec.params`` holds each species' parameters (its kind's ``SpeciesKind.params``). A
builder that declares an ``init_sizes`` parameter also gets the generation-0 sizes
``[S]`` of all species, one that declares ``guide`` the problem's sensitivity guide
(``search/guide.py``; None when the search computes none). A genetic algorithm only needs ``ga_group(kind,
species_indices, init, vary, decode)``; any other optimiser implements the
init/ask/tell protocol of :class:`SpeciesGroup`. ``decode`` returns choice indices into
the config's ``bit_choices`` for ``space.active_nodes`` and keep indices. Builders are
registered by value: :data:`BUILTIN_SPECIES`, ``nemo_jax.Registries.with_species``."""


def _direct_builder(space, specs, species_indices, capacity, graph, feature_dim,
                    init_sizes=None, guide=None) -> SpeciesGroup:
  return _direct_group(space, list(specs), tuple(species_indices), capacity, init_sizes,
                       guide)


def _gnn_builder(space, specs, species_indices, capacity, graph, feature_dim) -> SpeciesGroup:
  return _gnn_group(space, list(specs), tuple(species_indices), capacity, graph, feature_dim)


def _direct_key(spec: SpeciesConfig):
  return ("direct",)


def coarse_to_fine(n: int) -> np.ndarray:
  """``0..n-1`` in an order whose every prefix is spread over the whole range (the
  first and last position, then the middle, then the quarters, ...)."""
  if n <= 2:
    return np.arange(n)
  order, seen = [0, n - 1], {0, n - 1}
  parts = 2
  while len(order) < n:
    for j in range(1, parts, 2):
      i = int(round(j * (n - 1) / parts))
      if i not in seen:
        seen.add(i)
        order.append(i)
    parts *= 2
    if parts > 4 * n:
      order += [i for i in range(n) if i not in seen]
  return np.asarray(order[:n])


def _greedy_builder(space, specs, species_indices, capacity, graph, feature_dim,
                    guide=None) -> SpeciesGroup:
  """The greedy sensitivity allocation as a species (a baseline; beyond the NEMO paper).

  Its members are rows of the guide's greedy frontier (``search/guide.py``: from every
  quantizer at the highest choice, lower the one with the best cost saving per
  sensitivity loss, down to all at the lowest), proposed coarse to fine
  (:func:`coarse_to_fine`), so whatever budget it is given, the rows evaluated spread
  over the whole frontier; a species only proposes rows it has not proposed before
  (cycling when the frontier is exhausted: those repeats cost nothing). It learns
  nothing from the scores.
  """
  if guide is None:
    raise ValueError("species kind 'greedy': the search has no sensitivity guide; allowed: "
                     "a run that computes the problem's sensitivity (run/search.py)")
  if len(specs) != 1:
    raise ValueError(f"species: {len(specs)} species of kind 'greedy'; allowed: one (it "
                     "proposes the frontier rows in a fixed order)")
  frontier = jnp.asarray(guide.frontier, jnp.int32)
  order = jnp.asarray(coarse_to_fine(len(guide.frontier)), jnp.int32)
  keep = space.num_keep - 1

  def rows(start):                      # [1, C] frontier rows from position ``start`` [1]
    pos = start[:, None] + jnp.arange(capacity)[None, :]
    return order[pos % len(guide.frontier)]

  def init(key):
    del key
    start = jnp.zeros((1,), jnp.int32)
    return start, rows(start)

  def ask(key, start, priority, sizes):
    del key, priority, sizes
    return rows(start), start

  def tell(key, start, offspring, info):
    del key, offspring
    return start + jnp.sum(info.alive, axis=1).astype(jnp.int32)   # past the evaluated rows

  def decode(genomes):
    return frontier[genomes], jnp.full(genomes.shape, keep, jnp.int32)

  return SpeciesGroup("greedy", tuple(species_indices), init, ask, tell, decode)


BUILTIN_SPECIES: Mapping[str, SpeciesKind] = {
    "direct_round": SpeciesKind(_direct_builder, DirectParams, _direct_key),
    "direct_floor": SpeciesKind(_direct_builder, DirectParams, _direct_key),
    "random": SpeciesKind(_direct_builder, DirectParams, _direct_key),
    "gcn": SpeciesKind(_gnn_builder, GNNParams, gnn_structure),
    "graph_unet": SpeciesKind(_gnn_builder, GraphUNetParams, gnn_structure),
    "greedy": SpeciesKind(_greedy_builder),
}
"""The built-in species kinds (``Registries.species`` starts from these): the direct
encodings share one group, GNN species one group per structure (``gnn_structure``)."""


def declared(builder: Callable, name: str) -> bool:
  """Whether a builder declares the optional parameter ``name`` (:data:`GroupBuilder`)."""
  try:
    return name in inspect.signature(builder).parameters
  except (TypeError, ValueError):
    return False


def build_groups(species: Sequence[SpeciesConfig], space: SearchSpace, capacity: int, graph,
                 feature_dim: int, kinds: Mapping[str, SpeciesKind],
                 init_sizes=None, guide: SearchGuide | None = None) -> list[SpeciesGroup]:
  """Partitions the species into groups (order of first appearance).

  A species driven by an evosax strategy is a group of its own; the others are grouped
  by their kind's ``SpeciesKind.group`` key (default: the kind) and built by the kind's
  builder. ``init_sizes`` (int ``[S]``, default the capacity) are the generation-0
  sizes (how many seeds a seeded species evaluates) and ``guide`` the problem's
  sensitivity guide (``search/guide.py``), each given to builders that declare it.
  """
  keyed: dict[tuple, list[int]] = {}
  groups: list[tuple[tuple, list[int]]] = []
  for i, s in enumerate(species):
    if s.evosax_name is not None:
      groups.append((("evosax", i), [i]))
      continue
    entry = kinds[s.kind]
    key = ("kind", entry.group(s) if entry.group is not None else (s.kind,))
    if key not in keyed:
      keyed[key] = []
      groups.append((key, keyed[key]))
    keyed[key].append(i)
  out = []
  for key, members in groups:
    specs = [species[i] for i in members]
    if key[0] == "evosax":
      out.append(_evosax_group(space, specs[0], members[0], capacity, graph, feature_dim))
      continue
    builder = kinds[specs[0].kind].builder
    extra = {name: value for name, value in (("init_sizes", init_sizes), ("guide", guide))
             if declared(builder, name)}
    out.append(builder(space, specs, tuple(members), capacity, graph, feature_dim, **extra))
  return out
