"""A run's configuration: three sections, each validating itself, composed in ``SearchConfig``.

* ``problem`` (:class:`~nemo_jax._src.problem.config.ProblemConfig`): model, data,
  quantizers (one :class:`~nemo_jax._src.spec.QuantSpec`), costs and constraints, library;
* ``search`` (:class:`~nemo_jax._src.search.config.EvolutionConfig`): population,
  generations, species (a parameter dataclass per kind), selection, utility, archive,
  seed;
* ``run`` (:class:`RunConfig`): what happens after the loop: the selection images, the
  final re-evaluation on the test split and the hypervolume reference point.

Experiment files in ``experiments/configs/*.py`` define ``get_config()`` (big_vision
style; ``FILE.py:ARG`` selects a variant, ``get_config(ARG)``) returning the sections
``{"problem": {...}, "search": {...}, "run": {...}}``. A flat mapping (every field at
the top, as configs were written before the sections, and as command-line overrides
come) loads through ONE mapping, :data:`FLAT_KEYS` (``population`` is
``search.population``, ``weight_quant`` is ``problem.quant.weight_quant``, ...); an
unknown key is an error naming it and every allowed key. :func:`load_search_config`
accepts such a file, a JSON file or a mapping, applies overrides and validates
everything before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from nemo_jax._src import validate as v
from nemo_jax._src.config_file import load_config_file
from nemo_jax._src.graph import ALL_FEATURE_NAMES
from nemo_jax._src.problem.config import ProblemConfig
from nemo_jax._src.registries import Registries
from nemo_jax._src.search.config import EvolutionConfig
from nemo_jax._src.spec import FIELDS as QUANT_FIELDS


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The run section: what is measured and reported after the search loop.

  Attributes:
    selection_per_class: the selection set, held-out images per class of the problem's
      ``eval_split`` (disjoint from the fitness and calibration images, drawn after
      them), on which every front member and uniform baseline gets ``selection_top1``;
      reports pick members by it (0: no selection set). ``docs/DESIGN.md``, "Image sets".
    final_split, final_max_images: the split (and cap) on which the final front is
      re-evaluated for the report (None: skip).
    hv_ref: hypervolume reference point on the normalised objectives (None: all 1).
    sensitivity: write the per-quantizer sensitivity (``sensitivity.json`` / ``.png``,
      ``run/sensitivity.py``; cached by fingerprint) into the run directory.
  """
  selection_per_class: int = 50
  final_split: str | None = "test"
  final_max_images: int = 2000
  hv_ref: tuple[float, ...] | None = None
  sensitivity: bool = True

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    if d["hv_ref"] is not None:
      d["hv_ref"] = list(d["hv_ref"])
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], splits: tuple[str, ...]) -> "RunConfig":
    """The section from its fields (``splits``: what ``final_split`` may name)."""
    v.known_keys("run config", d, (f.name for f in dataclasses.fields(cls)))
    d = dict(d)
    if d.get("hv_ref") is not None:
      d["hv_ref"] = tuple(v.number("hv_ref", x) for x in v.sequence("hv_ref", d["hv_ref"]))
    cfg = cls(**d)
    v.integer("selection_per_class", cfg.selection_per_class, 0)
    if cfg.final_split is not None:
      v.choice("final_split", cfg.final_split, (None,) + tuple(splits))
    v.integer("final_max_images", cfg.final_max_images, 1)
    v.boolean("sensitivity", cfg.sensitivity)
    return cfg


SECTIONS = {"problem": ProblemConfig, "search": EvolutionConfig, "run": RunConfig}
"""Section name -> its dataclass."""


def _flat_keys() -> dict[str, tuple[str, ...]]:
  keys = {}
  for section, cls in SECTIONS.items():
    for f in dataclasses.fields(cls):
      if f.name != "quant":
        keys[f.name] = (section, f.name)
  keys.update({name: ("problem", "quant", name) for name in QUANT_FIELDS})
  return keys


FLAT_KEYS: Mapping[str, tuple[str, ...]] = _flat_keys()
"""Flat field name -> its path in the sections (the one mapping of flat configs and
overrides; ``"quant"`` itself is only a section key)."""


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Everything a search run depends on: three validated sections (module docstring).

  A field is read as ``cfg.search.population``; the flat form ``cfg.population`` reads
  the same field through :data:`FLAT_KEYS` (convenience for scripts; the sections are
  what the library passes around).
  """
  problem: ProblemConfig = ProblemConfig()
  search: EvolutionConfig = EvolutionConfig()
  run: RunConfig = RunConfig()

  def __getattr__(self, name: str):
    path = FLAT_KEYS.get(name)
    if path is None:
      raise AttributeError(f"SearchConfig has no field {name!r}; allowed: the sections "
                           f"{sorted(SECTIONS)} and their fields {sorted(FLAT_KEYS)}")
    out = self
    for p in path:
      out = getattr(out, p)
    return out

  @property
  def image_seed(self) -> int:
    """The seed drawing the image sets: ``problem.data_seed``, else ``search.seed``."""
    seed = self.problem.data_seed
    return self.search.seed if seed is None else seed

  def to_dict(self) -> dict:
    """The sectioned form ``{"problem": {...}, "search": {...}, "run": {...}}`` (JSON)."""
    return {name: getattr(self, name).to_dict() for name in SECTIONS}

  def flat_dict(self) -> dict:
    """Every field at the top (the flat form :func:`load_search_config` also accepts)."""
    return {name: _get(self.to_dict(), path) for name, path in FLAT_KEYS.items()}

  def replace(self, **changes) -> "SearchConfig":
    """A copy with flat fields replaced (``cfg.replace(num_classes=10)``), unvalidated."""
    sections = {name: getattr(self, name) for name in SECTIONS}
    for name, value in changes.items():
      path = FLAT_KEYS.get(name)
      if path is None:
        raise ValueError(f"{name}: unknown field; allowed: {sorted(FLAT_KEYS)}")
      section = sections[path[0]]
      if len(path) == 3:
        value = dataclasses.replace(section.quant, **{path[2]: value})
      sections[path[0]] = dataclasses.replace(section, **{path[-1] if len(path) == 2
                                                          else "quant": value})
    return SearchConfig(**sections)


def _get(d: Mapping, path: tuple[str, ...]):
  for p in path:
    d = d[p]
  return d


def sectioned(d: Mapping[str, Any]) -> dict[str, dict]:
  """A config mapping in sections: section keys are kept, flat keys moved into theirs.

  Raises:
    ValueError naming an unknown key and every allowed one.
  """
  if not isinstance(d, Mapping):
    raise ValueError(f"search config: expected a mapping (a dict, or a JSON object), got "
                     f"{type(d).__name__}")
  out: dict[str, dict] = {name: {} for name in SECTIONS}
  for key, value in d.items():
    if key in SECTIONS:
      if not isinstance(value, Mapping):
        v.fail(key, value, f"a mapping of {key} fields")
      section = dict(value)
      if key == "problem" and "quant" in section and not isinstance(section["quant"], Mapping):
        section["quant"] = section["quant"].to_dict()
      for k, x in section.items():
        if k == "quant" and key == "problem":
          out["problem"].setdefault("quant", {}).update(x)
        else:
          out[key][k] = x
      continue
    path = FLAT_KEYS.get(key)
    if path is None:
      raise ValueError(f"search config: unknown key {key!r}; allowed: the sections "
                       f"{sorted(SECTIONS)} or their fields {sorted(FLAT_KEYS)}")
    if len(path) == 3:
      out["problem"].setdefault("quant", {})[path[2]] = value
    else:
      out[path[0]][path[1]] = value
  return out


def validate_search_config(d: Mapping[str, Any] | SearchConfig,
                           registries: Registries | None = None) -> SearchConfig:
  """Builds a SearchConfig from a mapping (sectioned or flat), checking every field.

  Args:
    d: the fields (a mapping or a SearchConfig).
    registries: models, costs, schemes and species the config may name (default: the
      built-ins); the config's own ``custom_costs`` / ``custom_species`` plugins are
      added.

  Raises:
    ValueError naming the field, the value and what is allowed.
  """
  if isinstance(d, SearchConfig):
    d = d.to_dict()
  parts = sectioned(d)
  registries = (registries or Registries()).with_plugins(
      _plugin_field(parts["problem"], "custom_costs"),
      _plugin_field(parts["search"], "custom_species"))
  problem = ProblemConfig.from_dict(parts["problem"], registries.costs, registries.models,
                                    registries.schemes)
  search = EvolutionConfig.from_dict(parts["search"], registries.species, ALL_FEATURE_NAMES)
  run = RunConfig.from_dict(parts["run"], problem.splits)
  if run.hv_ref is not None and len(run.hv_ref) != len(problem.objectives):
    v.fail("hv_ref", list(run.hv_ref), f"{len(problem.objectives)} numbers (one per objective)")
  return SearchConfig(problem, search, run)


def _plugin_field(section: dict, key: str):
  value = section.get(key)
  if value is not None and not (isinstance(value, Mapping) and all(
      isinstance(k, str) and isinstance(x, str) for k, x in value.items())):
    v.fail(key, value, "a mapping {name: 'module:attr' or 'file.py:attr'}")
  return value


def load_search_config(source: str | Mapping[str, Any] | SearchConfig | None = None,
                       registries: Registries | None = None, **overrides) -> SearchConfig:
  """Loads, overrides (values that are not None) and validates a search config.

  Args:
    source: a ``.py`` file with ``get_config()`` (``FILE.py:ARG`` for a variant), a
      ``.json`` file, a mapping (sectioned or flat), a SearchConfig, or None for the
      embedded default.
    registries: extra models, costs, schemes and species the config may name.
    **overrides: flat fields to replace (e.g. ``generations=2`` from the CLI).
  """
  if source is None:
    d = {}
  elif isinstance(source, SearchConfig):
    d = source.to_dict()
  elif isinstance(source, Mapping):
    d = dict(source)
  else:
    d = load_config_file(os.fspath(source))
  parts = sectioned(d)
  changes = sectioned({k: x for k, x in overrides.items() if x is not None})
  for name in SECTIONS:
    quant = {**parts[name].get("quant", {}), **changes[name].get("quant", {})}
    parts[name].update(changes[name])
    if quant:
      parts[name]["quant"] = quant
  return validate_search_config(parts, registries)


def search_registries(cfg: SearchConfig, registries: Registries | None = None) -> Registries:
  """The registries of a validated config: ``registries`` plus the config's plugins."""
  return (registries or Registries()).with_plugins(cfg.problem.custom_costs,
                                                   cfg.search.custom_species)
