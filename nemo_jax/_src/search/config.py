"""The search section of a run's configuration: population, species, selection, resizing.

:class:`EvolutionConfig` holds what drives the evolution (NEMO's Algorithm 1) and
validates itself against the species kinds it may name (``species.BUILTIN_SPECIES`` plus
a user's, ``Registries.with_species``). Every species is a :class:`SpeciesConfig`: its
kind, optimizer and label plus a parameter dataclass of its own kind
(:class:`DirectParams`, :class:`GNNParams`, :class:`GraphUNetParams`, or a custom
kind's), so a parameter a kind does not have is an error naming it. The problem section
(``problem/config.py``) and the run section (``run/config.py``) sit beside it in
``SearchConfig``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Mapping, NamedTuple

from nemo_jax._src import validate as v

GA_OPTIMIZER = "ga"
EVOSAX_OPTIMIZERS = ("Open_ES", "CMA_ES", "Sep_CMA_ES", "SNES", "SimpleGA")
SELECTIONS = ("nsga3", "nsga2")
UTILITIES = ("r2", "front_count", "hv_contribution")
UTILITY_NORMS = ("ratio", "minmax")
EDGE_SETS = ("sequential", "dataflow")
INFEASIBLE_ACTIONS = ("warn", "error")


# --------------------------------------------------------------------------- species


@dataclasses.dataclass(frozen=True)
class DirectParams:
  """Parameters of a direct-encoding species (``direct_round``, ``direct_floor``,
  ``random``): one real gene per searched quantizer.

  Attributes:
    seed_uniform: ``direct_round`` / ``direct_floor`` with the ``ga`` optimizer only:
      start with uniform-precision members (every searched quantizer at the same bit
      choice, spread from the lowest to the highest; largest keep ratio), dealt so that
      two species never start with the same one (``species.seed_rows``), the rest random.
    seed_greedy: likewise, start with configurations of the greedy sensitivity frontier
      evenly spaced in cost (``search/guide.py``; beyond the NEMO paper).
    sensitivity_mutation: polynomial mutation moves insensitive genes more often and
      sensitive ones less (mean rate unchanged; beyond the NEMO paper).
    sbx_eta, sbx_prob: SBX crossover distribution index and probability.
    pm_eta: polynomial mutation distribution index (probability 1 / genes).
    sigma_init: initial step size when an evosax strategy drives the species.
  """
  seed_uniform: bool = False
  seed_greedy: bool = False
  sensitivity_mutation: bool = False
  sbx_eta: float = 15.0
  sbx_prob: float = 0.9
  pm_eta: float = 20.0
  sigma_init: float = 0.1

  @property
  def needs_guide(self) -> bool:
    return self.seed_greedy or self.sensitivity_mutation

  def validate(self, field: str) -> None:
    v.boolean(f"{field}.seed_uniform", self.seed_uniform)
    v.boolean(f"{field}.seed_greedy", self.seed_greedy)
    v.boolean(f"{field}.sensitivity_mutation", self.sensitivity_mutation)
    for f in ("sbx_eta", "pm_eta", "sigma_init"):
      v.number(f"{field}.{f}", getattr(self, f), 0.0, open_lo=True)
    v.number(f"{field}.sbx_prob", self.sbx_prob, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class GNNParams:
  """Parameters of a GNN-policy species (``gcn``): the genome is the policy's weights.

  Attributes:
    hidden: hidden width.
    heads: GAT attention heads (concatenated).
    output_selu: end in ``Linear -> SELU`` (the paper's literal form; default plain
      Linear, ``policies.py``).
    crossover_prob, mutation_prob, mutation_strength: SSNE parameters.
    sigma_init: initial step size when an evosax strategy drives the species.
  """
  hidden: int = 32
  heads: int = 1
  output_selu: bool = False
  crossover_prob: float = 0.5
  mutation_prob: float = 0.9
  mutation_strength: float = 0.1
  sigma_init: float = 0.1

  def validate(self, field: str) -> None:
    v.integer(f"{field}.hidden", self.hidden, 1)
    v.integer(f"{field}.heads", self.heads, 1)
    v.boolean(f"{field}.output_selu", self.output_selu)
    for f in ("mutation_strength", "sigma_init"):
      v.number(f"{field}.{f}", getattr(self, f), 0.0, open_lo=True)
    for f in ("crossover_prob", "mutation_prob"):
      v.number(f"{field}.{f}", getattr(self, f), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class GraphUNetParams(GNNParams):
  """Parameters of a ``graph_unet`` species: a GNN's plus its pooling.

  Attributes:
    depth: pooling levels.
    pool_ratio: fraction of nodes each gPool keeps, (0, 1].
  """
  depth: int = 1
  pool_ratio: float = 0.5

  def validate(self, field: str) -> None:
    super().validate(field)
    v.integer(f"{field}.depth", self.depth, 1)
    v.number(f"{field}.pool_ratio", self.pool_ratio, 0.0, 1.0, open_lo=True)


class SpeciesKind(NamedTuple):
  """A species kind as registered (``species.BUILTIN_SPECIES``, ``Registries.with_species``).

  Attributes:
    builder: ``builder(space, specs, species_indices, capacity, graph, feature_dim)
      -> SpeciesGroup`` (``species.GroupBuilder``); a builder that declares an
      ``init_sizes`` parameter also gets the generation-0 sizes ``[S]``.
    params: the frozen dataclass of the kind's parameters (a ``validate(field)``
      method, if it has one, checks the values), or None: the kind takes none.
    group: ``group(spec) -> key``: species of the kind with equal keys are stacked in
      one group (same genome structure); None: one group per kind.
  """
  builder: Callable[..., Any]
  params: type | None = None
  group: Callable[["SpeciesConfig"], Hashable] | None = None


@dataclasses.dataclass(frozen=True)
class SpeciesConfig:
  """One species.

  Attributes:
    kind: ``direct_round`` / ``direct_floor`` (one real gene per quantizer, rounded or
      floored to a bit choice), ``gcn`` / ``graph_unet`` (GNN policy; genome =
      weights), ``random`` (fresh uniform genomes every generation: the random-search
      baseline), or a registered custom kind.
    optimizer: ``ga`` (SBX + polynomial mutation for direct genes, SSNE for GNN
      weights) or ``evosax:NAME`` with NAME in ``EVOSAX_OPTIMIZERS`` (the species is
      then driven by that evosax strategy on a scalarised fitness).
    name: label in reports (default: kind).
    params: the kind's parameter dataclass (``SpeciesKind.params``; None for a kind
      without parameters). In a config the parameters sit beside ``kind``:
      ``{"kind": "gcn", "hidden": 16}``.
  """
  kind: str
  optimizer: str = GA_OPTIMIZER
  name: str | None = None
  params: Any = None

  @property
  def label(self) -> str:
    return self.name or self.kind

  @property
  def evosax_name(self) -> str | None:
    return self.optimizer.split(":", 1)[1] if self.optimizer.startswith("evosax:") else None

  def to_dict(self) -> dict:
    """The flat config form ``{"kind", "optimizer", "name", **params}``."""
    out = {"kind": self.kind, "optimizer": self.optimizer, "name": self.name}
    if self.params is not None:
      out.update(dataclasses.asdict(self.params))
    return out


DEFAULT_SPECIES = (SpeciesConfig("direct_round", params=DirectParams()),
                   SpeciesConfig("direct_floor", params=DirectParams()),
                   SpeciesConfig("gcn", params=GNNParams()),
                   SpeciesConfig("graph_unet", params=GraphUNetParams()))
"""NEMO's four species: two direct encodings, two GNN policies."""


def species_from(d: Any, i: int, kinds: Mapping[str, SpeciesKind]) -> SpeciesConfig:
  """One species from its config form (a kind name, a flat mapping or a SpeciesConfig).

  Raises:
    ValueError naming ``species[i]`` (or ``species[i].PARAM``) and what is allowed.
  """
  field = f"species[{i}]"
  if isinstance(d, SpeciesConfig):
    d = d.to_dict()
  if isinstance(d, str):
    d = {"kind": d}
  if not isinstance(d, Mapping):
    v.fail(field, d, "a mapping like {'kind': 'gcn'} or a kind name")
  if "kind" not in d:
    raise ValueError(f"{field}: 'kind' is required; allowed: {tuple(kinds)}")
  v.choice(f"{field}.kind", d["kind"], tuple(kinds))
  entry = kinds[d["kind"]]
  d = dict(d)
  head = {k: d.pop(k) for k in ("kind", "optimizer", "name") if k in d}
  values = dict(d.pop("params", None) or {}) | d
  if entry.params is None:
    if values:
      raise ValueError(f"{field}.{sorted(values)[0]}: kind {head['kind']!r} takes no "
                       "parameters; allowed: kind, optimizer, name")
    params = None
  else:
    allowed = [f.name for f in dataclasses.fields(entry.params)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
      raise ValueError(f"{field}.{unknown[0]}: not a parameter of kind {head['kind']!r}; "
                       f"allowed: {['kind', 'optimizer', 'name'] + allowed}")
    params = entry.params(**values)
    if hasattr(params, "validate"):
      params.validate(field)
  s = SpeciesConfig(params=params, **head)
  allowed_opt = (GA_OPTIMIZER,) + tuple(f"evosax:{n}" for n in EVOSAX_OPTIMIZERS)
  v.choice(f"{field}.optimizer", s.optimizer, allowed_opt)
  if s.name is not None:
    v.nonempty_string(f"{field}.name", s.name)
  if s.evosax_name is not None and not isinstance(params, (DirectParams, GNNParams)):
    v.fail(f"{field}.optimizer", s.optimizer, f"'ga' for kind {s.kind!r} (evosax drives "
           "the built-in direct and GNN kinds)")
  if s.kind == "random" and s.optimizer != GA_OPTIMIZER:
    v.fail(f"{field}.optimizer", s.optimizer, "'ga' for the random species")
  for flag in ("seed_uniform", "seed_greedy", "sensitivity_mutation"):
    if getattr(params, flag, False) and (
        s.kind not in ("direct_round", "direct_floor") or s.optimizer != GA_OPTIMIZER):
      v.fail(f"{field}.{flag}", True,
             "False unless kind is 'direct_round' / 'direct_floor' with optimizer 'ga'")
  return s


def species_labels(species) -> list[str]:
  """Unique display labels (name or kind; duplicates get ``-2``, ``-3``, ...)."""
  labels, seen = [], {}
  for s in species:
    label = s.label if isinstance(s, SpeciesConfig) else (s.get("name") or s["kind"])
    seen[label] = seen.get(label, 0) + 1
    labels.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
  return labels


# --------------------------------------------------------------------------- section


@dataclasses.dataclass(frozen=True)
class EvolutionConfig:
  """The search section: what drives the evolution (all objectives are minimised).

  Attributes:
    population, generations: total population size and number of generations; every
      generation evaluates exactly ``population`` new configurations.
    species: tuple of :class:`SpeciesConfig` (default: NEMO's four).
    selection: ``nsga3`` (NEMO's joint ranking) or ``nsga2``.
    resize: resize species by UCB on their utility (False: fixed equal sizes).
    utility: ``r2`` (R2 indicator, NEMO paper), ``front_count`` (members on the joint
      front, patent variant) or ``hv_contribution`` (exclusive hypervolume share of the
      species' candidates, reference ``hv_ref`` of the run section).
    utility_norm, utility_temperature: how utilities become UCB values in [0, 1]:
      ``ratio`` (score / best score, to the power ``1 / temperature``; continuous under
      fitness noise; the default 0.25 maps an R2 10% worse than the best to 0.68 and
      twice as bad to 0.06) or ``minmax`` (worst species 0, best 1; the earlier
      behaviour).
    max_growth: a species grows by at most this factor per generation (2.0: every slot
      is filled by an evaluated candidate); ``None`` (NEMO's Algorithm 1): no growth
      cap, slots beyond a species' evaluated candidates get random offspring.
    min_species_size, ucb_c, r2_partitions: species sizing parameters (a species never
      shrinks below ``min_species_size``, 1 allowed).
    budget: stop after the generation in which this many DISTINCT configurations have
      been evaluated (repeats are answered by the evaluation cache and cost nothing);
      None: ``generations`` decides alone.
    edges: ``sequential`` (NEMO) or ``dataflow`` graph edges for the GNN species.
    node_features: names of the node feature columns the GNN species see (None: all of
      ``graph.FEATURE_NAMES``; e.g. only the ``type:*`` one-hots for an ablation).
    sensitivity_features: append each searched quantizer's sensitivity (its top-1 drop
      alone at every bit choice, ``run/sensitivity.py``) to the GNN node features (beyond
      the NEMO paper).
    archive_size: capacity of the archive of non-dominated configurations.
    seed: the PRNG seed (also draws the image sets); same seed, same machine:
      identical results.
    infeasible: what to do when no configuration of generation 0 meets the
      constraints: ``warn`` (report the closest one and go on) or ``error``.
    custom_species: plugins ``{kind: "module:attr"}`` or ``{kind: "file.py:attr"}``:
      species builders imported before validation (``registries.py``).
  """
  population: int = 32
  generations: int = 25
  species: tuple[SpeciesConfig, ...] = DEFAULT_SPECIES
  selection: str = "nsga3"
  resize: bool = True
  utility: str = "r2"
  utility_norm: str = "ratio"
  utility_temperature: float = 0.25
  max_growth: float | None = None
  min_species_size: int = 4
  ucb_c: float = 0.5
  r2_partitions: int = 12
  budget: int | None = None
  edges: str = "sequential"
  node_features: tuple[str, ...] | None = None
  sensitivity_features: bool = False
  archive_size: int = 512
  seed: int = 0
  infeasible: str = "warn"
  custom_species: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @property
  def needs_guide(self) -> bool:
    """Whether the search uses the problem's sensitivity (``search/guide.py``)."""
    return self.sensitivity_features or any(
        s.kind == "greedy" or getattr(s.params, "needs_guide", False) for s in self.species)

  def to_dict(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["species"] = [s.to_dict() for s in self.species]
    d["custom_species"] = dict(self.custom_species)
    for k in ("node_features",):
      if d[k] is not None:
        d[k] = list(d[k])
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], kinds: Mapping[str, SpeciesKind],
                feature_names: tuple[str, ...]) -> "EvolutionConfig":
    """The section from its fields, every one checked.

    Args:
      d: the fields (missing ones take their defaults).
      kinds: the species kinds it may name (built-in and registered).
      feature_names: the node feature names ``node_features`` may pick from.

    Raises:
      ValueError naming the field, the value and what is allowed.
    """
    v.known_keys("search config", d, (f.name for f in dataclasses.fields(cls)))
    d = dict(d)
    if "custom_species" in d:
      d["custom_species"] = plugins("custom_species", d["custom_species"])
    if "species" in d:
      species = v.sequence("species", d["species"], "a non-empty list of species")
      if not species:
        v.fail("species", d["species"], "a non-empty list of species")
      d["species"] = tuple(species_from(s, i, kinds) for i, s in enumerate(species))
    else:
      d["species"] = tuple(species_from(s, i, kinds) for i, s in enumerate(cls.species))
    if d.get("node_features") is not None:
      d["node_features"] = v.sequence("node_features", d["node_features"],
                                      "a list of feature names or None")
    cfg = cls(**d)
    cfg.check(feature_names)
    return cfg

  def check(self, feature_names: tuple[str, ...]) -> None:
    """Checks every field but the species (checked as they are built)."""
    n_species = len(self.species)
    v.integer("min_species_size", self.min_species_size, 1)
    v.integer("population", self.population, 4)
    if self.population < n_species * self.min_species_size:
      v.fail("population", self.population,
             f"at least len(species) * min_species_size = {n_species * self.min_species_size}")
    v.integer("generations", self.generations, 0)
    if self.population * (self.generations + 1) > v.INT32_MAX:
      v.fail("population", self.population,
             f"population * (generations + 1) <= {v.INT32_MAX} (the engine counts "
             f"evaluations in int32; generations={self.generations})")
    v.choice("selection", self.selection, SELECTIONS)
    v.boolean("resize", self.resize)
    v.choice("utility", self.utility, UTILITIES)
    v.choice("utility_norm", self.utility_norm, UTILITY_NORMS)
    v.number("utility_temperature", self.utility_temperature, 0.0, open_lo=True)
    if (self.utility_temperature != EvolutionConfig.utility_temperature
        and self.utility_norm != "ratio"):
      v.fail("utility_temperature", self.utility_temperature,
             f"the default {EvolutionConfig.utility_temperature} unless utility_norm='ratio' "
             "(minmax has no temperature)")
    if self.max_growth is not None:
      v.number("max_growth", self.max_growth, 1.0)
    v.number("ucb_c", self.ucb_c, 0.0)
    v.integer("r2_partitions", self.r2_partitions, 1)
    v.choice("edges", self.edges, EDGE_SETS)
    if self.node_features is not None:
      if not self.node_features:
        v.fail("node_features", list(self.node_features),
               "a non-empty subset of " + str(feature_names))
      for f in self.node_features:
        v.choice("node_features", f, feature_names)
    v.integer("archive_size", self.archive_size, 2)
    if self.budget is not None:
      v.integer("budget", self.budget, 1)
    v.boolean("sensitivity_features", self.sensitivity_features)
    v.seed("seed", self.seed)
    v.choice("infeasible", self.infeasible, INFEASIBLE_ACTIONS)


def plugins(field: str, value: Any) -> dict:
  """A plugin mapping ``{name: "module:attr" or "file.py:attr"}``, checked."""
  if not isinstance(value, Mapping) or not all(
      isinstance(k, str) and isinstance(x, str) for k, x in value.items()):
    v.fail(field, value, "a mapping {name: 'module:attr' or 'file.py:attr'}")
  return dict(value)
