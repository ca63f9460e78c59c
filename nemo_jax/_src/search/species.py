"""Species: how a sub-population's genomes are initialised, varied and decoded.

Species that share a structure form a *group* whose genomes are stacked on a leading
species axis ``[S_g, C, ...]`` (``C`` = per-species capacity) so that initialisation,
variation and decoding run as one call vmapped over species and members:

* ``direct``: direct encodings (``direct_round``, ``direct_floor``, ``random``) with
  one real gene per searched quantizer (plus one keep gene when several keep ratios
  are searched), all in index space ``[0, K-1]``;
* ``gcn`` / ``graph_unet`` (one group per hidden width): GNN policy weights; the
  genome also carries ``keep_logits`` when several keep ratios are searched;
* every evosax-driven species is a group of its own (its strategy owns its state).

A species' live members are the first ``size`` slots of its capacity; the rest are
ignored padding, so shapes never change between generations.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from nemo_jax._src.search import operators as ops
from nemo_jax._src.search import policies
from nemo_jax._src.search.config import SearchConfig, SpeciesConfig

ROUNDING = {"direct_round": 0, "direct_floor": 1, "random": 0}


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """What the genomes decode to.

  Attributes:
    num_nodes: quantizer nodes of the workload graph (2 per layer: a_i, w_i).
    active_nodes: indices of the nodes whose bit-width is searched.
    num_choices: number of bit choices K.
    num_keep: number of keep-ratio choices (1: no keep gene).
  """
  num_nodes: int
  active_nodes: tuple[int, ...]
  num_choices: int
  num_keep: int

  @property
  def num_genes(self) -> int:
    return len(self.active_nodes) + (1 if self.num_keep > 1 else 0)


@dataclasses.dataclass(frozen=True)
class Group:
  """Species sharing one genome structure; members of the group are ``species``.

  ``init(key) -> genomes [S_g, C, ...]``; ``decode(genomes) -> (choice_idx [S_g, C,
  num_active], keep_idx [S_g, C])``; ``vary(key, genomes, priority [S_g, C], sizes
  [S_g]) -> offspring [S_g, C, ...]``. Evosax groups also have ``strategy`` and
  ``strategy_params`` and vary through ask/tell (done by the engine).
  """
  family: str
  species: tuple[int, ...]
  init: Callable
  decode: Callable
  vary: Callable | None
  strategy: Any = None
  strategy_params: Any = None


def _tournament_parents(key, priority, size, num):
  """Binary tournament among the first ``size`` members (lower priority wins)."""
  return ops.tournament_select(key, priority, num, valid=jnp.arange(priority.shape[0]) < size)


def _direct_group(space: SearchSpace, specs: list[SpeciesConfig], idx: tuple[int, ...],
                  capacity: int) -> Group:
  genes = space.num_genes
  high = jnp.concatenate([jnp.full((len(space.active_nodes),), space.num_choices - 1.0),
                          jnp.full((genes - len(space.active_nodes),), space.num_keep - 1.0)])
  low = jnp.zeros_like(high)
  floor_mode = jnp.asarray([ROUNDING[s.kind] for s in specs], jnp.int32)
  is_random = jnp.asarray([s.kind == "random" for s in specs])
  sbx_eta = jnp.asarray([s.sbx_eta for s in specs], jnp.float32)
  sbx_prob = jnp.asarray([s.sbx_prob for s in specs], jnp.float32)
  pm_eta = jnp.asarray([s.pm_eta for s in specs], jnp.float32)

  def init_one(key):
    return jax.random.uniform(key, (capacity, genes), minval=low, maxval=high)

  def init(key):
    return jax.vmap(init_one)(jax.random.split(key, len(specs)))

  def decode_one(g, floor):
    # Floor-rounding biases toward compression (the top choice needs gene == high).
    idx_ = jnp.where(floor == 1, ops.decode_floor(g, low, high), ops.decode_round(g, low, high))
    idx_ = idx_.astype(jnp.int32)
    n = len(space.active_nodes)
    keep = idx_[..., n] if genes > n else jnp.zeros(g.shape[:-1], jnp.int32)
    return idx_[..., :n], keep

  def decode(genomes):
    return jax.vmap(decode_one)(genomes, floor_mode)

  def vary_one(key, parents, priority, size, eta_c, p_c, eta_m, rnd):
    k_sel, k_x, k_m, k_r = jax.random.split(key, 4)
    half = (capacity + 1) // 2
    pick = _tournament_parents(k_sel, priority, size, 2 * half)
    a, b = parents[pick[:half]], parents[pick[half:]]
    c1, c2 = ops.sbx_crossover(k_x, a, b, low, high, eta=eta_c, prob=p_c)
    children = jnp.concatenate([c1, c2])[:capacity]
    children = ops.polynomial_mutation(k_m, children, low, high, eta=eta_m)
    fresh = init_one(k_r)
    return jnp.where(rnd, fresh, children)

  def vary(key, genomes, priority, sizes):
    keys = jax.random.split(key, len(specs))
    return jax.vmap(vary_one)(keys, genomes, priority, sizes, sbx_eta, sbx_prob, pm_eta,
                              is_random)

  return Group("direct", idx, init, decode, vary)


def _gnn_policy(spec: SpeciesConfig, num_choices: int):
  make = policies.gcn_policy if spec.kind == "gcn" else policies.graph_unet_policy
  return make(hidden=spec.hidden, n_choices=num_choices)


def _gnn_group(space: SearchSpace, specs: list[SpeciesConfig], idx: tuple[int, ...],
               capacity: int, graph, feature_dim: int) -> Group:
  policy = _gnn_policy(specs[0], space.num_choices)
  active = jnp.asarray(space.active_nodes, jnp.int32)
  mut_prob = jnp.asarray([s.mutation_prob for s in specs], jnp.float32)
  mut_strength = jnp.asarray([s.mutation_strength for s in specs], jnp.float32)
  cx_prob = jnp.asarray([s.crossover_prob for s in specs], jnp.float32)

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

  return Group(specs[0].kind, idx, init, decode, vary)


def _evosax_group(space: SearchSpace, spec: SpeciesConfig, i: int, capacity: int,
                  graph, feature_dim: int) -> Group:
  """A species driven by an evosax strategy (minimising a scalarised fitness)."""
  name = spec.evosax_name
  if spec.is_gnn:
    base = _gnn_group(space, [spec], (i,), 1, graph, feature_dim)
    template = jax.tree.map(lambda x: x[0, 0], base.init(jax.random.key(0)))

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
    kwargs["std_schedule"] = optax.constant_schedule(spec.sigma_init)
  if name == "Open_ES":
    kwargs["optimizer"] = optax.adam(0.05)
  strategy = cls(population_size=pop, solution=template, **kwargs)
  params = strategy.default_params
  if hasattr(params, "std_init"):
    params = params.replace(std_init=jnp.asarray(spec.sigma_init, jnp.float32))

  def init(key):
    k_init, k_pop = jax.random.split(key)
    if spec.is_gnn:
      sample = jax.vmap(lambda k: base.init(k))(jax.random.split(k_pop, pop))
      population = jax.tree.map(lambda x: x[:, 0, 0], sample)
    else:
      population = jax.random.uniform(k_pop, (pop, space.num_genes), maxval=1.0) * (
          jnp.asarray([space.num_choices - 1.0] * len(space.active_nodes)
                      + [space.num_keep - 1.0] * (space.num_genes - len(space.active_nodes))))
    if isinstance(strategy, evosax.algorithms.population_based.base.PopulationBasedAlgorithm):
      return strategy.init(k_init, population, jnp.full((pop,), jnp.inf), params)
    mean = jax.tree.map(lambda x: x.mean(0), population)
    return strategy.init(k_init, mean, params)

  def decode(genomes):
    return to_choices(jax.tree.map(lambda x: x[None, :capacity], genomes))

  return Group(f"evosax:{name}", (i,), init, decode, None, strategy, params)


GroupBuilder = Callable[..., Group]
_CUSTOM_BUILDERS: dict[str, GroupBuilder] = {}


def register_species(kind: str, builder: GroupBuilder) -> None:
  """Adds a species kind without editing the library.

  Args:
    kind: the name used as ``{"kind": kind}`` in a search config.
    builder: ``builder(space, specs, species_indices, capacity, graph, feature_dim) ->
      Group`` with pure ``init`` / ``decode`` / ``vary`` functions over genomes stacked
      ``[len(specs), capacity, ...]`` (see :class:`Group`); ``decode`` returns choice
      indices into the config's ``bit_choices`` for ``space.active_nodes`` and keep indices.
  """
  if not isinstance(kind, str) or not kind:
    raise ValueError(f"kind: expected a non-empty string, got {kind!r}")
  if not callable(builder):
    raise ValueError(f"builder: expected a callable returning a Group, got {builder!r}")
  _CUSTOM_BUILDERS[kind] = builder


def custom_kinds() -> tuple[str, ...]:
  """Species kinds added with :func:`register_species`."""
  return tuple(_CUSTOM_BUILDERS)


def build_groups(cfg: SearchConfig, space: SearchSpace, capacity: int, graph,
                 feature_dim: int) -> list[Group]:
  """Partitions ``cfg.species`` into groups (order of first appearance)."""
  keyed: dict[tuple, list[int]] = {}
  groups: list[tuple[tuple, list[int]]] = []
  for i, s in enumerate(cfg.species):
    if s.kind in _CUSTOM_BUILDERS:
      key = ("custom", s.kind)
      if key not in keyed:
        keyed[key] = []
        groups.append((key, keyed[key]))
      keyed[key].append(i)
      continue
    if s.evosax_name is not None:
      groups.append((("evosax", i), [i]))
      continue
    key = ("direct",) if not s.is_gnn else (s.kind, s.hidden)
    if key not in keyed:
      keyed[key] = []
      groups.append((key, keyed[key]))
    keyed[key].append(i)
  out = []
  for key, members in groups:
    specs = [cfg.species[i] for i in members]
    if key[0] == "custom":
      out.append(_CUSTOM_BUILDERS[key[1]](space, specs, tuple(members), capacity, graph,
                                          feature_dim))
    elif key[0] == "evosax":
      out.append(_evosax_group(space, specs[0], members[0], capacity, graph, feature_dim))
    elif key[0] == "direct":
      out.append(_direct_group(space, specs, tuple(members), capacity))
    else:
      out.append(_gnn_group(space, specs, tuple(members), capacity, graph, feature_dim))
  return out
