"""The registries of a run, passed explicitly (never global state).

A :class:`Registries` value bundles the four extension points, each starting from the
built-ins, which are registered the same way a user's entries are:

* ``costs``: objective name -> cost function (``costs.registry.CostRegistry``);
* ``species``: kind -> ``SpeciesKind(builder, params, group)`` (``search/species.py``;
  a kind may declare a parameter dataclass, validated from the config's species entry);
* ``schemes``: scheme name -> ``builder(source, spec, calibration, tables)``
  (``schemes.py``);
* ``models``: model name -> constructor and default spec (``models.ModelRegistry``).

It is handed to :func:`nemo_jax.search` / ``build_problem`` / config validation. So that a
run started from the command line, or resumed later from its ``config.json``, finds the
same costs and species, a search config may name them as plugins, imported by path::

    "custom_costs":   {"latency": "my_pkg.latency:latency_cost"},
    "custom_species": {"my_direct": "experiments/custom_objective_and_species.py:build"}

(``module:attr`` or ``file.py:attr``; see ``config_file.resolve_object``). A species
plugin is a builder, or a ``SpeciesKind`` when the kind takes parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from nemo_jax._src import config_file
from nemo_jax._src.costs.registry import CostFn, CostRegistry
from nemo_jax._src.models import ZOO, ModelRegistry
from nemo_jax._src.schemes import BUILTIN_SCHEMES, SchemeBuilder
from nemo_jax._src.search.config import SpeciesKind
from nemo_jax._src.search.species import BUILTIN_SPECIES


def _add(table: Mapping[str, Any], key: str, value, what: str, same) -> dict:
  if not isinstance(key, str) or not key:
    raise ValueError(f"{what}={key!r} is invalid; allowed: a non-empty string")
  if key in table and not same(table[key], value):
    raise ValueError(f"{what}={key!r} is invalid: already registered; allowed: a new {what}")
  return {**table, key: value}


@dataclasses.dataclass(frozen=True)
class Registries:
  """Cost functions, species kinds, schemes and models available to a run.

  Attributes:
    costs: the cost registry (built-ins plus user costs).
    species: ``{kind: SpeciesKind}`` (built-ins plus user kinds).
    schemes: ``{name: SchemeBuilder}`` (``ptq``, ``library`` plus user schemes).
    models: the model registry (the zoo plus user models).
  """
  costs: CostRegistry = dataclasses.field(default_factory=CostRegistry.default)
  species: Mapping[str, SpeciesKind] = dataclasses.field(
      default_factory=lambda: dict(BUILTIN_SPECIES))
  schemes: Mapping[str, SchemeBuilder] = dataclasses.field(
      default_factory=lambda: dict(BUILTIN_SCHEMES))
  models: ModelRegistry = ZOO

  def with_cost(self, name: str, fn: CostFn) -> "Registries":
    """A copy with the cost ``fn(workload, configs) -> float32 [P]`` (minimised) added."""
    return dataclasses.replace(self, costs=self.costs.with_cost(name, fn))

  def with_species(self, kind: str, builder: Callable[..., Any] | SpeciesKind,
                   params: type | None = None) -> "Registries":
    """A copy with the species ``kind`` built by ``builder`` (``species.GroupBuilder``).

    Args:
      kind: the name configs use (``{"kind": kind, ...}``).
      builder: the group builder, or a complete ``SpeciesKind``.
      params: optional frozen dataclass of the kind's parameters: a config's species
        entry may then set its fields (``{"kind": kind, "width": 3}``), validated by
        the dataclass (and its ``validate(field)`` method, if any); the builder reads
        them as ``spec.params``.
    """
    entry = builder if isinstance(builder, SpeciesKind) else SpeciesKind(builder, params)
    if not callable(entry.builder):
      raise ValueError(f"builder={entry.builder!r} is invalid; allowed: a callable "
                       "returning a species group")
    if entry.params is not None and not dataclasses.is_dataclass(entry.params):
      raise ValueError(f"params={entry.params!r} is invalid; allowed: None or a dataclass "
                       "of the kind's parameters")
    same = lambda a, b: a.builder is b.builder and a.params is b.params
    return dataclasses.replace(self, species=_add(self.species, kind, entry, "kind", same))

  def with_scheme(self, name: str, builder: SchemeBuilder) -> "Registries":
    """A copy with the scheme ``builder(source, spec, calibration, tables) ->
    QuantScheme`` as ``name`` (a config's ``scheme`` picks it)."""
    if not callable(builder):
      raise ValueError(f"builder={builder!r} is invalid; allowed: a callable returning a "
                       "QuantScheme")
    return dataclasses.replace(
        self, schemes=_add(self.schemes, name, builder, "scheme", lambda a, b: a is b))

  def with_model(self, name: str, constructor: Callable[..., Any], input_shape=(224, 224, 3),
                 num_classes: int = 1000) -> "Registries":
    """A copy with the model ``constructor(input_shape, num_classes, **kwargs)`` as
    ``name`` (a quantization-aware module, as the zoo's; ``models.ModelRegistry``)."""
    return dataclasses.replace(
        self, models=self.models.with_model(name, constructor, input_shape, num_classes))

  def with_plugins(self, custom_costs: Mapping[str, str] | None = None,
                   custom_species: Mapping[str, str] | None = None) -> "Registries":
    """A copy with the plugins a config names (``{name: "module:attr"}``) imported."""
    out = self
    for name, spec in dict(custom_costs or {}).items():
      fn = config_file.resolve_object(spec, f"custom_costs[{name!r}]")
      if name in out.costs and out.costs[name] is fn:
        continue
      out = out.with_cost(name, fn)
    for kind, spec in dict(custom_species or {}).items():
      out = out.with_species(kind, config_file.resolve_object(spec, f"custom_species[{kind!r}]"))
    return out
