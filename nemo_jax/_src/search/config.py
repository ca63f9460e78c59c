"""Search configuration: one validated, frozen dataclass per run.

Experiment files in ``experiments/configs/*.py`` define ``get_config()`` returning a plain
dict (big_vision style); ``load_search_config`` accepts such a file, a JSON file or a
dict, applies command-line overrides, and validates everything before any work starts:
an unknown key or a bad value raises ValueError naming the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import numbers
import os
from typing import Any, Mapping

SPECIES_KINDS = ("direct_round", "direct_floor", "gcn", "graph_unet", "random")
GA_OPTIMIZER = "ga"
EVOSAX_OPTIMIZERS = ("Open_ES", "CMA_ES", "Sep_CMA_ES", "SNES", "SimpleGA")
SELECTIONS = ("nsga3", "nsga2")
UTILITIES = ("r2", "front_count")
EDGE_SETS = ("sequential", "dataflow")
ACCURACY_OBJECTIVES = ("top1_error", "top5_error")
INFEASIBLE_ACTIONS = ("warn", "error")


@dataclasses.dataclass(frozen=True)
class SpeciesConfig:
  """One species.

  Attributes:
    kind: ``direct_round`` / ``direct_floor`` (one real gene per quantizer, rounded or
      floored to a bit choice), ``gcn`` / ``graph_unet`` (GNN policy; genome = weights),
      ``random`` (fresh uniform genomes every generation: the random-search baseline).
    optimizer: ``ga`` (SBX + polynomial mutation for direct genes, SSNE for GNN
      weights) or ``evosax:NAME`` with NAME in ``EVOSAX_OPTIMIZERS`` (the species is
      then driven by that evosax strategy on a scalarised fitness).
    name: label in reports (default: kind).
    hidden: GNN hidden width.
    sbx_eta, sbx_prob, pm_eta: direct-encoding operator parameters (pm_prob = 1/genes).
    crossover_prob, mutation_prob, mutation_strength: SSNE parameters (GNN species).
    sigma_init: initial step size of an evosax strategy.
  """
  kind: str
  optimizer: str = GA_OPTIMIZER
  name: str | None = None
  hidden: int = 32
  sbx_eta: float = 15.0
  sbx_prob: float = 0.9
  pm_eta: float = 20.0
  crossover_prob: float = 0.5
  mutation_prob: float = 0.9
  mutation_strength: float = 0.1
  sigma_init: float = 0.1

  @property
  def label(self) -> str:
    return self.name or self.kind

  @property
  def is_gnn(self) -> bool:
    return self.kind in ("gcn", "graph_unet")

  @property
  def evosax_name(self) -> str | None:
    return self.optimizer.split(":", 1)[1] if self.optimizer.startswith("evosax:") else None


DEFAULT_SPECIES = (SpeciesConfig("direct_round"), SpeciesConfig("direct_floor"),
                   SpeciesConfig("gcn"), SpeciesConfig("graph_unet"))


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Everything a search run depends on (all objectives are minimised).

  Attributes:
    model, input_shape, num_classes: the zoo model (input_shape/num_classes default to
      the dataset's).
    checkpoint: ``"default"`` (the shipped default model) or a path to a variables file
      (``nemo-jax convert`` / ``nemo-jax train`` output).
    dataset, data_dir: evaluation data (local files only).
    eval_split, eval_per_class: the fitness subset (NEMO: 5 images per class of the
      TRAINING split).
    calib_per_class, calib_batches: calibration subset and number of batches.
    final_split, final_max_images: the split (and cap) on which the final front is
      re-evaluated for the report (None: skip).
    objectives: any of ``top1_error``, ``top5_error`` and the registered costs
      (``model_ratio``, ``bops_ratio``, ``energy:X|Y``, ``size_kb:csr``, ...).
    constraints: ``{objective_or_cost_name: upper_bound}``, handled by constraint
      domination.
    bit_choices: candidate bit-widths of every quantizer (NEMO: 2..8).
    quantize_activations: search activation bits too; otherwise activations stay at
      ``fixed_act_bits`` (EMOMC: 16).
    keep_choices: candidate global keep ratios (pruning); ``(1.0,)`` = no pruning.
    population, generations: total population size and number of generations; every
      generation evaluates exactly ``population`` new configurations.
    species: tuple of SpeciesConfig.
    selection: ``nsga3`` (NEMO's joint ranking) or ``nsga2``.
    resize: resize species by UCB on their utility (False: fixed equal sizes).
    utility: ``r2`` (R2 indicator, NEMO paper) or ``front_count`` (patent variant).
    min_species_size, ucb_c, r2_partitions: species sizing parameters.
    edges: ``sequential`` (NEMO) or ``dataflow`` graph edges for the GNN species.
    node_features: names of the node feature columns the GNN species see (None: all of
      ``graph.FEATURE_NAMES``; e.g. only the ``type:*`` one-hots for an ablation).
    archive_size: capacity of the archive of non-dominated configurations.
    hv_ref: hypervolume reference point on the normalised objectives (None: all 1).
    seed: the PRNG seed; same seed, same machine: identical results.
    eval_batch_size, eval_strategy: evaluation settings (``auto``, ``map``, ``vmap``,
      ``chunked_vmap``).
    library: an EMOMC pruned-model library (``nemo-jax prune-library`` output); when
      set, every keep choice must be one of its ratios and each configuration is
      evaluated on that ratio's pruned + retrained model (``emomc/problem.py``).
    infeasible: what to do when no configuration of generation 0 meets the
      constraints: ``warn`` (report the closest one and go on) or ``error``.
  """
  model: str = "resnet20"
  input_shape: tuple[int, int, int] | None = None
  num_classes: int | None = None
  checkpoint: str = "default"
  dataset: str = "fashion_mnist_embedded"
  data_dir: str | None = None
  eval_split: str = "train"
  eval_per_class: int = 25
  calib_per_class: int = 10
  calib_batches: int = 4
  final_split: str | None = "test"
  final_max_images: int = 2000
  objectives: tuple[str, ...] = ("top1_error", "model_ratio", "bops_ratio")
  constraints: Mapping[str, float] = dataclasses.field(default_factory=dict)
  bit_choices: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
  quantize_activations: bool = True
  fixed_act_bits: int = 16
  keep_choices: tuple[float, ...] = (1.0,)
  population: int = 32
  generations: int = 25
  species: tuple[SpeciesConfig, ...] = DEFAULT_SPECIES
  selection: str = "nsga3"
  resize: bool = True
  utility: str = "r2"
  min_species_size: int = 4
  ucb_c: float = 0.5
  r2_partitions: int = 12
  edges: str = "sequential"
  node_features: tuple[str, ...] | None = None
  archive_size: int = 512
  hv_ref: tuple[float, ...] | None = None
  seed: int = 0
  eval_batch_size: int = 256
  eval_strategy: str = "auto"
  library: str | None = None
  infeasible: str = "warn"

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["constraints"] = dict(self.constraints)
    return d


def _fail(field, value, allowed):
  raise ValueError(f"{field}={value!r} is invalid; allowed: {allowed}")


def _positive_int(field, v, minimum=1):
  if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
    _fail(field, v, f"an integer >= {minimum}")
  return int(v)


def _number(field, v, lo=None, hi=None, open_lo=False):
  if isinstance(v, bool) or not isinstance(v, numbers.Real):
    _fail(field, v, "a number")
  v = float(v)
  if lo is not None and (v < lo or (open_lo and v == lo)):
    _fail(field, v, f"a number {'>' if open_lo else '>='} {lo}" + (f" and <= {hi}" if hi is not None else ""))
  if hi is not None and v > hi:
    _fail(field, v, f"a number <= {hi}")
  return v


def _species_from(d: Any, i: int) -> SpeciesConfig:
  if isinstance(d, SpeciesConfig):
    d = dataclasses.asdict(d)
  if isinstance(d, str):
    d = {"kind": d}
  if not isinstance(d, Mapping):
    _fail(f"species[{i}]", d, "a mapping like {'kind': 'gcn'} or a kind name")
  fields = {f.name for f in dataclasses.fields(SpeciesConfig)}
  unknown = set(d) - fields
  if unknown:
    raise ValueError(f"species[{i}]: unknown key(s) {sorted(unknown)}; allowed: {sorted(fields)}")
  if "kind" not in d:
    raise ValueError(f"species[{i}]: 'kind' is required; allowed: {SPECIES_KINDS}")
  s = SpeciesConfig(**d)
  from nemo_jax._src.search import species as species_lib  # local: species imports config
  kinds = SPECIES_KINDS + species_lib.custom_kinds()
  if s.kind not in kinds:
    _fail(f"species[{i}].kind", s.kind, kinds)
  allowed_opt = (GA_OPTIMIZER,) + tuple(f"evosax:{n}" for n in EVOSAX_OPTIMIZERS)
  if s.optimizer not in allowed_opt:
    _fail(f"species[{i}].optimizer", s.optimizer, allowed_opt)
  if s.kind == "random" and s.optimizer != GA_OPTIMIZER:
    _fail(f"species[{i}].optimizer", s.optimizer, "'ga' for the random species")
  _positive_int(f"species[{i}].hidden", s.hidden)
  for f in ("sbx_eta", "pm_eta", "mutation_strength", "sigma_init"):
    _number(f"species[{i}].{f}", getattr(s, f), 0.0, open_lo=True)
  for f in ("sbx_prob", "crossover_prob", "mutation_prob"):
    _number(f"species[{i}].{f}", getattr(s, f), 0.0, 1.0)
  return s


def validate_search_config(d: Mapping[str, Any] | SearchConfig) -> SearchConfig:
  """Builds a SearchConfig from a mapping, checking every field.

  Raises:
    ValueError naming the field, the value and what is allowed.
  """
  from nemo_jax._src import costs as costs_lib
  from nemo_jax._src import data as data_lib
  from nemo_jax._src import models as models_lib

  if isinstance(d, SearchConfig):
    d = d.to_dict()
  if not isinstance(d, Mapping):
    raise ValueError(f"search config: expected a mapping, got {type(d).__name__}")
  fields = {f.name for f in dataclasses.fields(SearchConfig)}
  unknown = set(d) - fields
  if unknown:
    raise ValueError(f"search config: unknown key(s) {sorted(unknown)}; allowed: {sorted(fields)}")
  d = dict(d)
  if d.get("model", "resnet20") not in models_lib.list_models():
    _fail("model", d.get("model"), models_lib.list_models())
  if d.get("dataset", "fashion_mnist_embedded") not in data_lib.DATASETS:
    _fail("dataset", d.get("dataset"), sorted(data_lib.DATASETS))
  if "species" in d:
    if not isinstance(d["species"], (list, tuple)) or not d["species"]:
      _fail("species", d["species"], "a non-empty list of species")
    d["species"] = tuple(_species_from(s, i) for i, s in enumerate(d["species"]))
  for k in ("objectives", "bit_choices", "keep_choices"):
    if k in d:
      if isinstance(d[k], (str, bytes)) or not isinstance(d[k], (list, tuple)):
        _fail(k, d[k], "a list")
      d[k] = tuple(d[k])
  if d.get("input_shape") is not None:
    shp = d["input_shape"]
    if (not isinstance(shp, (list, tuple)) or len(shp) != 3
        or not all(isinstance(s, int) and s > 0 for s in shp)):
      _fail("input_shape", shp, "[H, W, C] positive integers")
    d["input_shape"] = tuple(shp)
  if d.get("node_features") is not None:
    if isinstance(d["node_features"], str) or not isinstance(d["node_features"], (list, tuple)):
      _fail("node_features", d["node_features"], "a list of feature names or None")
    d["node_features"] = tuple(d["node_features"])
  if d.get("hv_ref") is not None:
    d["hv_ref"] = tuple(float(v) for v in d["hv_ref"])
  cfg = SearchConfig(**d)

  if cfg.num_classes is not None:
    _positive_int("num_classes", cfg.num_classes)
  splits = data_lib.DATASETS[cfg.dataset].splits
  if cfg.eval_split not in splits:
    _fail("eval_split", cfg.eval_split, splits)
  if cfg.final_split is not None and cfg.final_split not in splits:
    _fail("final_split", cfg.final_split, (None,) + tuple(splits))
  _positive_int("eval_per_class", cfg.eval_per_class)
  _positive_int("calib_per_class", cfg.calib_per_class)
  _positive_int("calib_batches", cfg.calib_batches)
  _positive_int("final_max_images", cfg.final_max_images)
  allowed_obj = ACCURACY_OBJECTIVES + tuple(costs_lib.available_objectives())
  if len(cfg.objectives) < 2:
    _fail("objectives", list(cfg.objectives), "at least two of " + str(allowed_obj))
  if len(set(cfg.objectives)) != len(cfg.objectives):
    _fail("objectives", list(cfg.objectives), "distinct names")
  for o in cfg.objectives:
    if o not in allowed_obj:
      _fail("objectives", o, allowed_obj)
  if not isinstance(cfg.constraints, Mapping):
    _fail("constraints", cfg.constraints, "a mapping {name: upper_bound}")
  for name, bound in cfg.constraints.items():
    if name not in allowed_obj:
      _fail("constraints", name, allowed_obj)
    _number(f"constraints[{name!r}]", bound)
  if not cfg.bit_choices:
    _fail("bit_choices", cfg.bit_choices, "a non-empty list of integers in 1..32")
  for b in cfg.bit_choices:
    if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 1 <= b <= 32:
      _fail("bit_choices", b, "integers in 1..32")
  if list(cfg.bit_choices) != sorted(set(cfg.bit_choices)):
    _fail("bit_choices", list(cfg.bit_choices), "strictly increasing integers")
  if not isinstance(cfg.quantize_activations, bool):
    _fail("quantize_activations", cfg.quantize_activations, (True, False))
  if not 1 <= int(cfg.fixed_act_bits) <= 32:
    _fail("fixed_act_bits", cfg.fixed_act_bits, "an integer in 1..32")
  if not cfg.keep_choices:
    _fail("keep_choices", cfg.keep_choices, "a non-empty list of numbers in (0, 1]")
  for p in cfg.keep_choices:
    _number("keep_choices", p, 0.0, 1.0, open_lo=True)
  if list(cfg.keep_choices) != sorted(set(cfg.keep_choices)):
    _fail("keep_choices", list(cfg.keep_choices), "strictly increasing numbers")
  _positive_int("generations", cfg.generations, 0)
  n_species = len(cfg.species)
  _positive_int("min_species_size", cfg.min_species_size, 2)
  _positive_int("population", cfg.population, 4)
  if cfg.population < n_species * cfg.min_species_size:
    _fail("population", cfg.population,
          f"at least len(species) * min_species_size = {n_species * cfg.min_species_size}")
  if cfg.selection not in SELECTIONS:
    _fail("selection", cfg.selection, SELECTIONS)
  if cfg.utility not in UTILITIES:
    _fail("utility", cfg.utility, UTILITIES)
  if cfg.edges not in EDGE_SETS:
    _fail("edges", cfg.edges, EDGE_SETS)
  if cfg.node_features is not None:
    from nemo_jax._src.graph import FEATURE_NAMES
    if not cfg.node_features:
      _fail("node_features", list(cfg.node_features), "a non-empty subset of " + str(FEATURE_NAMES))
    for f in cfg.node_features:
      if f not in FEATURE_NAMES:
        _fail("node_features", f, FEATURE_NAMES)
  _number("ucb_c", cfg.ucb_c, 0.0)
  _positive_int("r2_partitions", cfg.r2_partitions)
  _positive_int("archive_size", cfg.archive_size, 2)
  _positive_int("eval_batch_size", cfg.eval_batch_size)
  if cfg.eval_strategy not in ("auto", "map", "vmap", "chunked_vmap"):
    _fail("eval_strategy", cfg.eval_strategy, ("auto", "map", "vmap", "chunked_vmap"))
  if cfg.hv_ref is not None and len(cfg.hv_ref) != len(cfg.objectives):
    _fail("hv_ref", list(cfg.hv_ref), f"{len(cfg.objectives)} numbers (one per objective)")
  if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
    _fail("seed", cfg.seed, "an integer")
  if not isinstance(cfg.checkpoint, str) or not cfg.checkpoint:
    _fail("checkpoint", cfg.checkpoint, "'default' or a variables file path")
  if cfg.library is not None and (not isinstance(cfg.library, str) or not cfg.library):
    _fail("library", cfg.library, "None or a library directory (`nemo-jax prune-library`)")
  if cfg.infeasible not in INFEASIBLE_ACTIONS:
    _fail("infeasible", cfg.infeasible, INFEASIBLE_ACTIONS)
  return cfg


def load_config_file(path: str, function: str = "get_config") -> Mapping[str, Any]:
  """Reads a ``.json`` config or calls ``function()`` (``get_config``) of a ``.py`` one.

  ``FILE.py:ARG`` calls ``function(ARG)`` (big_vision's convention for variants).
  """
  arg = None
  if ".py:" in path:
    path, arg = path.rsplit(":", 1)
  if not os.path.exists(path):
    raise ValueError(f"config file {path!r} does not exist")
  if path.endswith(".json"):
    with open(path) as f:
      try:
        return json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"config file {path}: not valid JSON ({e})") from None
  if path.endswith(".py"):
    spec = importlib.util.spec_from_file_location("_nemo_jax_user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, function):
      raise ValueError(f"config file {path}: defines no {function}()")
    get = getattr(module, function)
    return get() if arg is None else get(arg)
  raise ValueError(f"config file {path}: expected a .py (with {function}()) or .json file")


def load_search_config(source: str | Mapping[str, Any] | SearchConfig | None = None,
                       **overrides) -> SearchConfig:
  """Loads, overrides (values that are not None) and validates a search config.

  Args:
    source: a ``.py`` file with ``get_config()``, a ``.json`` file, a mapping, a
      SearchConfig, or None for the embedded default.
    **overrides: fields to replace (e.g. ``generations=2`` from the CLI).
  """
  if source is None:
    d = SearchConfig().to_dict()
  elif isinstance(source, SearchConfig):
    d = source.to_dict()
  elif isinstance(source, Mapping):
    d = dict(source)
  else:
    d = dict(load_config_file(os.fspath(source)))
  d.update({k: v for k, v in overrides.items() if v is not None})
  return validate_search_config(d)


def species_labels(species) -> list[str]:
  """Unique display labels (name or kind; duplicates get ``-2``, ``-3``, ...)."""
  labels, seen = [], {}
  for s in species:
    label = s.label if isinstance(s, SpeciesConfig) else (s.get("name") or s["kind"])
    seen[label] = seen.get(label, 0) + 1
    labels.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
  return labels
