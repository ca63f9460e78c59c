"""Search configuration: one validated, frozen dataclass per run.

Experiment files in ``experiments/configs/*.py`` define ``get_config()`` returning a plain
dict (big_vision style; ``FILE.py:ARG`` selects a variant, ``get_config(ARG)``);
``load_search_config`` accepts such a file, a JSON file or a dict, applies command-line
overrides, and validates everything before any work starts: an unknown key or a bad
value raises ValueError naming the field and the allowed values. Custom costs and
species come from an explicit :class:`~nemo_jax._src.registries.Registries` (or are
named as plugins in the config itself, so the CLI and a resumed run find them).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from nemo_jax._src import data as data_lib
from nemo_jax._src import models as models_lib
from nemo_jax._src import quant
from nemo_jax._src import validate as v
from nemo_jax._src.config_file import load_config_file
from nemo_jax._src.graph import ALL_FEATURE_NAMES
from nemo_jax._src.layers import PLACEMENTS
from nemo_jax._src.registries import Registries
from nemo_jax._src.tables import CALIBRATIONS

SPECIES_KINDS = ("direct_round", "direct_floor", "gcn", "graph_unet", "random")
GA_OPTIMIZER = "ga"
EVOSAX_OPTIMIZERS = ("Open_ES", "CMA_ES", "Sep_CMA_ES", "SNES", "SimpleGA")
SELECTIONS = ("nsga3", "nsga2")
UTILITIES = ("r2", "front_count", "hv_contribution")
UTILITY_NORMS = ("ratio", "minmax")
EDGE_SETS = ("sequential", "dataflow")
ACCURACY_OBJECTIVES = ("top1_error", "top5_error")
INFEASIBLE_ACTIONS = ("warn", "error")
EVAL_STRATEGIES = ("auto", "map", "vmap", "chunked_vmap")
USER_MODEL = "custom"
"""``model`` of a search whose module is passed in memory (``search(model=...)``)."""
IN_MEMORY_DATASET = "arrays"
"""``dataset`` of a search whose data arrays are passed in memory (``search(data=...)``)."""
IN_MEMORY_SPLITS = ("train", "test")


def is_model_factory(name) -> bool:
  """Whether ``model`` names a factory (``"package.module:attr"`` / ``"file.py:attr"``)."""
  return isinstance(name, str) and ":" in name


def is_user_model(name) -> bool:
  """A model that is not in the zoo: a factory or one passed in memory."""
  return name == USER_MODEL or is_model_factory(name)


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
    heads: GAT attention heads of a GNN species (concatenated).
    depth: pooling levels of a ``graph_unet`` species.
    pool_ratio: fraction of nodes each gPool of a ``graph_unet`` species keeps, (0, 1].
    output_selu: end a GNN species in ``Linear -> SELU`` (the paper's literal form;
      default plain Linear, ``policies.py``).
    seed_uniform: a ``direct_round`` / ``direct_floor`` species starts with
      ``min(len(bit_choices), size)`` uniform-precision members (every searched
      quantizer at the same bit choice, spread from the lowest to the highest; largest
      keep ratio), the rest random.
    sbx_eta, sbx_prob, pm_eta: direct-encoding operator parameters (pm_prob = 1/genes).
    crossover_prob, mutation_prob, mutation_strength: SSNE parameters (GNN species).
    sigma_init: initial step size of an evosax strategy.
  """
  kind: str
  optimizer: str = GA_OPTIMIZER
  name: str | None = None
  hidden: int = 32
  heads: int = 1
  depth: int = 1
  pool_ratio: float = 0.5
  output_selu: bool = False
  seed_uniform: bool = False
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
    model, input_shape, num_classes: the model (input_shape/num_classes default to
      the dataset's): a zoo name, a factory ``"package.module:attr"`` /
      ``"file.py:attr"`` called without arguments and returning ``(module, variables)``
      of any linen model (quantized by interception, ``intercept.py``), or
      ``"custom"`` for a module passed to ``search(model=..., variables=...)``.
    checkpoint: ``"default"`` (the shipped default model) or a path to a variables file
      (``nemo-jax convert`` / ``nemo-jax train`` output).
    dataset, data_dir: evaluation data (local files only), or ``"arrays"`` for splits
      passed to ``search(data=...)`` (used as given: already preprocessed).
    eval_split, eval_per_class: the fitness subset (NEMO: 5 images per class of the
      TRAINING split).
    calib_per_class, calib_batches: calibration subset and number of batches.
    selection_per_class: the selection set, held-out images per class of
      ``eval_split`` (disjoint from the fitness and calibration images), on which every
      front member and uniform baseline gets ``selection_top1``; reports pick members
      by it (0: no selection set). The three sets: ``docs/DESIGN.md``, "Image sets".
    final_split, final_max_images: the split (and cap) on which the final front is
      re-evaluated for the report (None: skip).
    objectives: any of ``top1_error``, ``top5_error`` and the registered costs
      (``model_ratio``, ``bops_ratio``, ``energy:X|Y``, ``size_kb:csr``, ...).
    constraints: ``{objective_or_cost_name: upper_bound}``, handled by constraint
      domination.
    bit_choices: candidate bit-widths of every quantizer (NEMO: 2..8).
    quantize_activations: search activation bits too (``activation_format="int"``);
      otherwise every activation uses ``fixed_act_bits``.
    activation_format: what layer inputs become: ``int`` (uniform affine fake
      quantization at the searched or fixed bits; NEMO), ``fp16`` (rounded to float16;
      EMOMC) or ``float32`` (untouched). Costs count 16 / 32 activation bits for the
      last two.
    fixed_act_bits: integer activation bits when they are not searched (``int`` only).
    weight_quant: weight quantizer (``quant.WEIGHT_MODES``; default NEMO's uniform affine
      per output channel, ``asymmetric_per_channel``; EMOMC: ``symmetric_per_tensor``).
    weight_range: its integer range, ``narrow`` or ``full`` (``quant.WEIGHT_RANGES``);
      None: the mode's own (narrow for symmetric, full for asymmetric).
    act_quant: integer activation quantizer (``quant.ACT_QUANTS``): ``affine``
      (NEMO) or ``symmetric`` (zero point fixed; unsigned after ReLU).
    calibration: post-training calibration (``tables.CALIBRATIONS``): ``minmax``
      (NEMO), ``percentile``, ``mse``, ``output_mse``, ``adaround`` and the
      ``*bias_correction`` variants; tables per (layer, bit-width) computed once and
      cached, looked up per member.
    placement: where activation quantizers sit: ``conv_inputs`` (one per conv/dense
      input) or ``nncf`` (one per tensor shared by its readers, plus residual-add and
      max-pool inputs; NEMO's 116 / 125 / 244 quantizers).
    keep_choices: candidate global keep ratios (pruning); ``(1.0,)`` = no pruning.
    population, generations: total population size and number of generations; every
      generation evaluates exactly ``population`` new configurations.
    species: tuple of SpeciesConfig.
    selection: ``nsga3`` (NEMO's joint ranking) or ``nsga2``.
    resize: resize species by UCB on their utility (False: fixed equal sizes).
    utility: ``r2`` (R2 indicator, NEMO paper), ``front_count`` (members on the joint
      front, patent variant) or ``hv_contribution`` (exclusive hypervolume share of the
      species' candidates, reference ``hv_ref``).
    utility_norm, utility_temperature: how utilities become UCB values in [0, 1]:
      ``ratio`` (score / best score, to the power ``1 / temperature``; continuous under
      fitness noise; the default 0.25 maps an R2 10% worse than the best to 0.68 and
      twice as bad to 0.06) or ``minmax`` (worst species 0, best 1; the earlier
      behaviour).
    max_growth: a species grows by at most this factor per generation (2.0: every slot
      is filled by an evaluated candidate); ``None`` (NEMO's Algorithm 1): no growth
      cap, slots beyond a species' evaluated candidates get random offspring.
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
    custom_costs, custom_species: plugins, ``{name: "module:attr"}`` or
      ``{name: "file.py:attr"}``: user cost functions / species builders imported
      before validation (``registries.py``).
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
  selection_per_class: int = 50
  final_split: str | None = "test"
  final_max_images: int = 2000
  objectives: tuple[str, ...] = ("top1_error", "model_ratio", "bops_ratio")
  constraints: Mapping[str, float] = dataclasses.field(default_factory=dict)
  bit_choices: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
  quantize_activations: bool = True
  activation_format: str = "int"
  fixed_act_bits: int = 8
  weight_quant: str = "asymmetric_per_channel"   # NEMO: uniform affine weights
  weight_range: str | None = None
  act_quant: str = "affine"
  calibration: str = "minmax"
  placement: str = "conv_inputs"
  keep_choices: tuple[float, ...] = (1.0,)
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
  edges: str = "sequential"
  node_features: tuple[str, ...] | None = None
  archive_size: int = 512
  hv_ref: tuple[float, ...] | None = None
  seed: int = 0
  eval_batch_size: int = 256
  eval_strategy: str = "auto"
  library: str | None = None
  infeasible: str = "warn"
  custom_costs: Mapping[str, str] = dataclasses.field(default_factory=dict)
  custom_species: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    for k in ("constraints", "custom_costs", "custom_species"):
      d[k] = dict(getattr(self, k))
    return d

  @property
  def act_fill_bits(self) -> int:
    """The bit-width of activations that are not searched (what costs count)."""
    return {"int": self.fixed_act_bits, "fp16": 16, "float32": quant.FLOAT_BITS}[
        self.activation_format]

  @property
  def resolved_input_shape(self) -> tuple[int, int, int]:
    if self.input_shape is None and self.dataset == IN_MEMORY_DATASET:
      raise ValueError("input_shape: required with dataset='arrays' (search() sets it from "
                       "the data); allowed: (H, W, C)")
    return tuple(self.input_shape or data_lib.DATASETS[self.dataset].input_shape)

  @property
  def resolved_num_classes(self) -> int | None:
    """The classes (None with ``dataset="arrays"`` and no ``num_classes``)."""
    if self.num_classes or self.dataset == IN_MEMORY_DATASET:
      return self.num_classes
    return data_lib.DATASETS[self.dataset].num_classes


def _species_from(d: Any, i: int, kinds: tuple[str, ...]) -> SpeciesConfig:
  if isinstance(d, SpeciesConfig):
    d = dataclasses.asdict(d)
  if isinstance(d, str):
    d = {"kind": d}
  if not isinstance(d, Mapping):
    v.fail(f"species[{i}]", d, "a mapping like {'kind': 'gcn'} or a kind name")
  if "kind" not in d:
    raise ValueError(f"species[{i}]: 'kind' is required; allowed: {kinds}")
  s = v.dataclass_from(SpeciesConfig, f"species[{i}]", d)
  v.choice(f"species[{i}].kind", s.kind, kinds)
  allowed_opt = (GA_OPTIMIZER,) + tuple(f"evosax:{n}" for n in EVOSAX_OPTIMIZERS)
  v.choice(f"species[{i}].optimizer", s.optimizer, allowed_opt)
  if s.kind == "random" and s.optimizer != GA_OPTIMIZER:
    v.fail(f"species[{i}].optimizer", s.optimizer, "'ga' for the random species")
  v.integer(f"species[{i}].hidden", s.hidden, 1)
  v.integer(f"species[{i}].heads", s.heads, 1)
  v.integer(f"species[{i}].depth", s.depth, 1)
  v.number(f"species[{i}].pool_ratio", s.pool_ratio, 0.0, 1.0, open_lo=True)
  v.boolean(f"species[{i}].output_selu", s.output_selu)
  v.boolean(f"species[{i}].seed_uniform", s.seed_uniform)
  defaults = SpeciesConfig(s.kind)
  if s.kind not in ("gcn", "graph_unet"):
    for f in ("heads", "output_selu"):
      if getattr(s, f) != getattr(defaults, f):
        v.fail(f"species[{i}].{f}", getattr(s, f),
               f"the default {getattr(defaults, f)!r} for kind {s.kind!r} (GNN species only)")
  if s.kind != "graph_unet":
    for f in ("depth", "pool_ratio"):
      if getattr(s, f) != getattr(defaults, f):
        v.fail(f"species[{i}].{f}", getattr(s, f),
               f"the default {getattr(defaults, f)!r} for kind {s.kind!r} (graph_unet only)")
  if s.seed_uniform and (s.kind not in ("direct_round", "direct_floor")
                         or s.optimizer != GA_OPTIMIZER):
    v.fail(f"species[{i}].seed_uniform", True,
           "False unless kind is 'direct_round' / 'direct_floor' with optimizer 'ga'")
  for f in ("sbx_eta", "pm_eta", "mutation_strength", "sigma_init"):
    v.number(f"species[{i}].{f}", getattr(s, f), 0.0, open_lo=True)
  for f in ("sbx_prob", "crossover_prob", "mutation_prob"):
    v.number(f"species[{i}].{f}", getattr(s, f), 0.0, 1.0)
  return s


def _plugins(field: str, value: Any) -> dict:
  if not isinstance(value, Mapping) or not all(
      isinstance(k, str) and isinstance(x, str) for k, x in value.items()):
    v.fail(field, value, "a mapping {name: 'module:attr' or 'file.py:attr'}")
  return dict(value)


def validate_search_config(d: Mapping[str, Any] | SearchConfig,
                           registries: Registries | None = None) -> SearchConfig:
  """Builds a SearchConfig from a mapping, checking every field.

  Args:
    d: the fields (a mapping or a SearchConfig).
    registries: costs and custom species the config may name (default: built-ins);
      the config's own ``custom_costs`` / ``custom_species`` plugins are added.

  Raises:
    ValueError naming the field, the value and what is allowed.
  """
  if isinstance(d, SearchConfig):
    d = d.to_dict()
  v.known_keys("search config", d, (f.name for f in dataclasses.fields(SearchConfig)))
  d = dict(d)
  for k in ("custom_costs", "custom_species"):
    if k in d:
      d[k] = _plugins(k, d[k])
  registries = (registries or Registries()).with_plugins(d.get("custom_costs"),
                                                         d.get("custom_species"))
  model = d.get("model", SearchConfig.model)
  if not is_user_model(model):
    try:
      models_lib.check_model_name(model)
    except ValueError:
      v.fail("model", model, f"a zoo name {models_lib.list_models()}, a factory "
             "'package.module:attr' / 'file.py:attr' returning (module, variables), or "
             f"{USER_MODEL!r} (a module passed to search(model=...))")
  v.choice("dataset", d.get("dataset", SearchConfig.dataset),
           sorted(data_lib.DATASETS) + [IN_MEMORY_DATASET])
  kinds = SPECIES_KINDS + tuple(k for k in registries.species if k not in SPECIES_KINDS)
  if "species" in d:
    species = v.sequence("species", d["species"], "a non-empty list of species")
    if not species:
      v.fail("species", d["species"], "a non-empty list of species")
    d["species"] = tuple(_species_from(s, i, kinds) for i, s in enumerate(species))
  else:
    for i, s in enumerate(SearchConfig.species):
      v.choice(f"species[{i}].kind", s.kind, kinds)
  for k in ("objectives", "bit_choices", "keep_choices"):
    if k in d:
      d[k] = v.sequence(k, d[k])
  if d.get("input_shape") is not None:
    d["input_shape"] = v.input_shape("input_shape", d["input_shape"])
  if d.get("node_features") is not None:
    d["node_features"] = v.sequence("node_features", d["node_features"],
                                    "a list of feature names or None")
  if d.get("hv_ref") is not None:
    d["hv_ref"] = tuple(v.number("hv_ref", x) for x in v.sequence("hv_ref", d["hv_ref"]))
  cfg = SearchConfig(**d)

  v.optional_integer("num_classes", cfg.num_classes, 1)
  splits = (IN_MEMORY_SPLITS if cfg.dataset == IN_MEMORY_DATASET
            else data_lib.DATASETS[cfg.dataset].splits)
  v.choice("eval_split", cfg.eval_split, splits)
  if cfg.final_split is not None:
    v.choice("final_split", cfg.final_split, (None,) + tuple(splits))
  for f in ("eval_per_class", "calib_per_class", "calib_batches", "final_max_images",
            "r2_partitions", "eval_batch_size"):
    v.integer(f, getattr(cfg, f), 1)
  v.integer("selection_per_class", cfg.selection_per_class, 0)
  allowed_obj = ACCURACY_OBJECTIVES + tuple(registries.costs)
  if len(cfg.objectives) < 2:
    v.fail("objectives", list(cfg.objectives), "at least two of " + str(allowed_obj))
  if len(set(cfg.objectives)) != len(cfg.objectives):
    v.fail("objectives", list(cfg.objectives), "distinct names")
  for o in cfg.objectives:
    v.choice("objectives", o, allowed_obj)
  if not isinstance(cfg.constraints, Mapping):
    v.fail("constraints", cfg.constraints, "a mapping {name: upper_bound}")
  for name, bound in cfg.constraints.items():
    v.choice("constraints", name, allowed_obj)
    v.number(f"constraints[{name!r}]", bound)
  if not cfg.bit_choices:
    v.fail("bit_choices", cfg.bit_choices, "a non-empty list of integers in 1..32")
  for b in cfg.bit_choices:
    v.integer("bit_choices", b, quant.MIN_BITS, quant.MAX_BITS)
  v.increasing("bit_choices", cfg.bit_choices, "integers")
  v.boolean("quantize_activations", cfg.quantize_activations)
  v.choice("activation_format", cfg.activation_format, quant.ACTIVATION_FORMATS)
  if cfg.quantize_activations and cfg.activation_format != "int":
    v.fail("quantize_activations", True, f"False with activation_format="
           f"{cfg.activation_format!r} (only integer activations have bits to search)")
  v.integer("fixed_act_bits", cfg.fixed_act_bits, quant.MIN_BITS, quant.MAX_BITS)
  v.choice("weight_quant", cfg.weight_quant, quant.WEIGHT_MODES)
  v.choice("weight_range", cfg.weight_range, (None,) + quant.WEIGHT_RANGES)
  v.choice("act_quant", cfg.act_quant, quant.ACT_QUANTS)
  if cfg.act_quant != "affine" and cfg.activation_format != "int":
    v.fail("act_quant", cfg.act_quant, f"'affine' with activation_format="
           f"{cfg.activation_format!r} (only integer activations have a quantizer)")
  v.choice("calibration", cfg.calibration, tuple(CALIBRATIONS))
  v.choice("placement", cfg.placement, PLACEMENTS)
  if not cfg.keep_choices:
    v.fail("keep_choices", cfg.keep_choices, "a non-empty list of numbers in (0, 1]")
  for p in cfg.keep_choices:
    v.keep_ratio("keep_choices", p)
  v.increasing("keep_choices", cfg.keep_choices, "numbers")
  v.integer("generations", cfg.generations, 0)
  n_species = len(cfg.species)
  v.integer("min_species_size", cfg.min_species_size, 2)
  v.integer("population", cfg.population, 4)
  if cfg.population < n_species * cfg.min_species_size:
    v.fail("population", cfg.population,
           f"at least len(species) * min_species_size = {n_species * cfg.min_species_size}")
  v.choice("selection", cfg.selection, SELECTIONS)
  v.choice("utility", cfg.utility, UTILITIES)
  v.choice("utility_norm", cfg.utility_norm, UTILITY_NORMS)
  v.number("utility_temperature", cfg.utility_temperature, 0.0, open_lo=True)
  if (cfg.utility_temperature != SearchConfig.utility_temperature
      and cfg.utility_norm != "ratio"):
    v.fail("utility_temperature", cfg.utility_temperature,
           f"the default {SearchConfig.utility_temperature} unless utility_norm='ratio' "
           "(minmax has no temperature)")
  if cfg.max_growth is not None:
    v.number("max_growth", cfg.max_growth, 1.0)
  v.choice("edges", cfg.edges, EDGE_SETS)
  v.boolean("resize", cfg.resize)
  if cfg.node_features is not None:
    if not cfg.node_features:
      v.fail("node_features", list(cfg.node_features),
             "a non-empty subset of " + str(ALL_FEATURE_NAMES))
    for f in cfg.node_features:
      v.choice("node_features", f, ALL_FEATURE_NAMES)
  v.number("ucb_c", cfg.ucb_c, 0.0)
  v.integer("archive_size", cfg.archive_size, 2)
  v.choice("eval_strategy", cfg.eval_strategy, EVAL_STRATEGIES)
  if cfg.hv_ref is not None and len(cfg.hv_ref) != len(cfg.objectives):
    v.fail("hv_ref", list(cfg.hv_ref), f"{len(cfg.objectives)} numbers (one per objective)")
  v.integer("seed", cfg.seed)
  v.nonempty_string("checkpoint", cfg.checkpoint, "'default' or a variables file path")
  if is_user_model(cfg.model) and cfg.checkpoint != "default":
    v.fail("checkpoint", cfg.checkpoint, f"'default' with model={cfg.model!r} (the "
           "variables come from the factory / search(variables=...))")
  if is_user_model(cfg.model) and cfg.library is not None:
    v.fail("library", cfg.library, f"None with model={cfg.model!r} (EMOMC libraries are "
           "built for zoo models)")
  if cfg.library is not None:
    v.nonempty_string("library", cfg.library,
                      "None or a library directory (`nemo-jax prune-library`)")
    if cfg.activation_format == "int":
      v.fail("activation_format", cfg.activation_format,
             "'fp16' (EMOMC) or 'float32' with a library")
    if cfg.calibration != "minmax":
      v.fail("calibration", cfg.calibration, "'minmax' with a library (its entries are "
             "not calibrated)")
  v.choice("infeasible", cfg.infeasible, INFEASIBLE_ACTIONS)
  return cfg


def load_search_config(source: str | Mapping[str, Any] | SearchConfig | None = None,
                       registries: Registries | None = None, **overrides) -> SearchConfig:
  """Loads, overrides (values that are not None) and validates a search config.

  Args:
    source: a ``.py`` file with ``get_config()`` (``FILE.py:ARG`` for a variant), a
      ``.json`` file, a mapping, a SearchConfig, or None for the embedded default.
    registries: extra costs / species the config may name.
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
  d.update({k: x for k, x in overrides.items() if x is not None})
  return validate_search_config(d, registries)


def search_registries(cfg: SearchConfig, registries: Registries | None = None) -> Registries:
  """The registries of a validated config: ``registries`` plus the config's plugins."""
  return (registries or Registries()).with_plugins(cfg.custom_costs, cfg.custom_species)


def species_labels(species) -> list[str]:
  """Unique display labels (name or kind; duplicates get ``-2``, ``-3``, ...)."""
  labels, seen = [], {}
  for s in species:
    label = s.label if isinstance(s, SpeciesConfig) else (s.get("name") or s["kind"])
    seen[label] = seen.get(label, 0) + 1
    labels.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
  return labels
