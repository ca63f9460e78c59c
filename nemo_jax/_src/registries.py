"""The user-extensible registries of a run, passed explicitly (never global state).

A :class:`Registries` value bundles the cost registry (objective name -> cost function,
``costs.registry.CostRegistry``) and the custom species builders (kind -> builder,
``search.species``). It is handed to :func:`nemo_jax.search` / ``build_problem`` /
config validation. So that a run started from the command line, or resumed later from
its ``config.json``, finds the same extensions, a search config may name them as
plugins, imported by path::

    "custom_costs":   {"latency": "my_pkg.latency:latency_cost"},
    "custom_species": {"my_direct": "experiments/custom_objective_and_species.py:build"}

(``module:attr`` or ``file.py:attr``; see ``config_file.resolve_object``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from nemo_jax._src import config_file
from nemo_jax._src.costs.registry import CostFn, CostRegistry


@dataclasses.dataclass(frozen=True)
class Registries:
  """Cost functions and custom species builders available to a run.

  Attributes:
    costs: the cost registry (built-ins plus user costs).
    species: ``{kind: builder}`` of custom species (see ``search.species``); the
      built-in kinds need no entry.
  """
  costs: CostRegistry = dataclasses.field(default_factory=CostRegistry.default)
  species: Mapping[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)

  def with_cost(self, name: str, fn: CostFn) -> "Registries":
    """A copy with the cost ``fn(workload, configs) -> float32 [P]`` (minimised) added."""
    return dataclasses.replace(self, costs=self.costs.with_cost(name, fn))

  def with_species(self, kind: str, builder: Callable[..., Any]) -> "Registries":
    """A copy with a custom species ``kind`` built by ``builder`` (``search.species``)."""
    if not isinstance(kind, str) or not kind:
      raise ValueError(f"kind={kind!r} is invalid; allowed: a non-empty string")
    if not callable(builder):
      raise ValueError(f"builder={builder!r} is invalid; allowed: a callable returning a "
                       "species group")
    if kind in self.species and self.species[kind] is not builder:
      raise ValueError(f"kind={kind!r} is invalid: already registered; allowed: a new kind")
    return dataclasses.replace(self, species={**self.species, kind: builder})

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
