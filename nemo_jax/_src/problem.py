"""The optimisation problem, composed once per run: model source + scheme + data + costs.

:func:`build_problem` composes three independent choices of a search config
(``docs/DESIGN.md``, "Problem"):

1. the model source (:func:`load_model_source`): a float checkpoint (NEMO) or an EMOMC
   library of pre-pruned models (``library=DIR``);
2. the quantization scheme (``schemes.ptq`` for a checkpoint, ``schemes.library`` for
   a library), with the config's ``weight_quant`` / ``weight_range``, ``act_quant`` and
   ``activation_format``; integer activations are calibrated (cached by fingerprint,
   ``calibration.py``) and a ``calibration`` other than ``minmax`` gets its per-bit
   tables (``tables.py``, cached the same way);
3. the cost names (objectives + constraints + the always-reported ``model_ratio`` and
   ``bops_ratio``) from an explicit cost registry.

``Problem.objectives(configs)`` maps a population ``QuantConfig[P]`` to

* ``F`` ``[P, M]``: the objectives, all MINIMISED and normalised so that the FP32
  model scores 1 on every cost objective (ratios to FP32) and accuracy enters as error
  in [0, 1]; NaN marks a failed evaluation (non-finite logits), which the Pareto
  toolkit ranks last;
* ``violation`` ``[P]``: total normalised constraint violation (0 = feasible);
* ``raw``: every objective and constrained quantity in its own unit (``energy:X|Y`` in
  EMOMC's 0.01 mJ, ``size_kb:csr`` in KB, ...), for reports.

Configurations decoded from the search's choices are valid by construction: they stay
on the device from decode through costs and the evaluator; only the scores come to the
host (once per generation) to be combined in float64.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nemo_jax._src import calibration as calib_lib
from nemo_jax._src import checkpoint as ckpt
from nemo_jax._src import data as data_lib
from nemo_jax._src import graph as graph_lib
from nemo_jax._src import intercept as intercept_lib
from nemo_jax._src import models as models_lib
from nemo_jax._src import quant
from nemo_jax._src import schemes
from nemo_jax._src import tables as tables_lib
from nemo_jax._src import workload as workload_lib
from nemo_jax._src.config import QuantConfig, validate_configs
from nemo_jax._src.costs.registry import CostRegistry, make_objectives_fn
from nemo_jax._src.emomc import io as library_io
from nemo_jax._src.evaluator import Evaluator
from nemo_jax._src.registries import Registries
from nemo_jax._src.search.config import (ACCURACY_OBJECTIVES, IN_MEMORY_DATASET,
                                         IN_MEMORY_SPLITS, USER_MODEL, SearchConfig,
                                         is_model_factory, is_user_model, search_registries)
from nemo_jax._src.search.species import SearchSpace

MIN_LIBRARY_WEIGHT_BITS = 2   # EMOMC's symmetric formula needs 2^(q-1) - 1 >= 1


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where the evaluated weights come from.

  Attributes:
    kind: ``"checkpoint"`` (one float model) or ``"library"`` (pre-pruned entries).
    model: the Flax module.
    variables: what the scheme prepares: the float variables, or the library entries
      stacked ``[K, ...]``.
    input_shape, num_classes: the model's.
    dense_variables: the unpruned float variables (the FP32 reference).
    ratios: keep ratios of the stacked library entries (library only).
    library_dir, library_meta: the library and its parsed ``library.json``.
  """
  kind: str
  model: Any
  variables: Any
  input_shape: tuple[int, int, int]
  num_classes: int
  dense_variables: Any
  ratios: tuple[float, ...] = ()
  library_dir: str | None = None
  library_meta: dict | None = None


def population_pad(cfg: SearchConfig) -> int:
  """Members per device such that one padded shape serves every batch of <= population
  configs (generations, uniform baselines, final re-evaluation chunks)."""
  return -(-cfg.population // jax.device_count())


# --------------------------------------------------------------------------- sources


def check_library_config(cfg: SearchConfig, meta: dict, library_dir: str) -> None:
  """Checks a search config against a library (before anything expensive runs).

  Raises:
    ValueError naming the field, the value and the allowed values: a keep ratio missing
    from the library, bit-widths below 2, or another model / input shape.
  """
  s = meta["settings"]
  if s["model"] != cfg.model:
    raise ValueError(f"model={cfg.model!r} does not match the library {library_dir!r}, "
                     f"which holds {s['model']!r}; allowed: {s['model']!r}")
  shape = list(cfg.resolved_input_shape)
  if list(s["input_shape"]) != shape:
    raise ValueError(f"input_shape={shape} does not match the library {library_dir!r} "
                     f"({s['input_shape']}); allowed: {s['input_shape']}")
  available = library_io.library_ratios(meta)
  for p in cfg.keep_choices:
    entry = meta["entries"].get(library_io.ratio_key(p))
    if entry is None or abs(float(entry["keep"]) - p) > schemes.KEEP_MATCH_TOLERANCE:
      raise ValueError(f"keep_choices: keep ratio {p!r} is missing from the library "
                       f"{library_dir!r}; available: {list(available)}")
  for b in cfg.bit_choices:
    if b < MIN_LIBRARY_WEIGHT_BITS:
      raise ValueError(f"bit_choices: bit-width {b} is outside the EMOMC range; allowed: "
                       f"integers {MIN_LIBRARY_WEIGHT_BITS}..{quant.FLOAT_BITS} (EMOMC: 2..12)")


def user_model_source(cfg: SearchConfig, model, variables) -> ModelSource:
  """A user's linen model (quantized by interception) and its float variables.

  The number of classes is read off the model's output.

  Raises:
    ValueError: a model whose output is not ``[N, classes]``, or one with parameters
      feeding products no handled layer computes (``intercept.check_intercepted``).
  """
  shape = cfg.resolved_input_shape
  model = intercept_lib.intercept(model)
  variables = jax.tree.map(jnp.asarray, variables)
  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  try:
    out = jax.eval_shape(lambda v, x: model.apply(v, x, None, train=False), variables, x)
  except Exception as e:  # a model that cannot run on the data's shape
    raise ValueError(f"model: {type(e).__name__} running it on input_shape={shape}: "
                     f"{e}") from None
  if not hasattr(out, "shape") or len(out.shape) != 2:
    raise ValueError(f"model: output {getattr(out, 'shape', type(out).__name__)} on "
                     f"input_shape={shape}; allowed: logits [N, classes]")
  intercept_lib.check_intercepted(model, variables, shape)
  return ModelSource("checkpoint", model, variables, shape, int(out.shape[-1]), variables)


def load_model_source(cfg: SearchConfig, progress: bool = True, model=None,
                      variables=None) -> ModelSource:
  """The checkpoint, library or user model of a search config.

  A library source stacks the entries of ``keep_choices`` plus the dense model (the
  report's quantization-only baseline, p = 1): ``(K + 1) * 4 * params`` bytes resident
  (VGG-16 with the 61 ratios 0.20..0.80: ~3.6 GB). A user model comes from
  ``model`` / ``variables`` (``cfg.model == "custom"``) or the factory ``cfg.model``
  names (``intercept.load_model_factory``).
  """
  if model is not None or variables is not None:
    if model is None or variables is None:
      raise ValueError("model, variables: pass both (a flax.linen.Module and its variables) "
                       "or neither")
    return user_model_source(cfg, *intercept_lib.check_user_model(model, variables))
  if cfg.model == USER_MODEL:
    raise ValueError(f"model={USER_MODEL!r}: pass model= and variables= to nemo_jax.search "
                     "/ build_problem (the config names no zoo model or factory)")
  if is_model_factory(cfg.model):
    return user_model_source(cfg, *intercept_lib.load_model_factory(cfg.model))
  shape, classes = cfg.resolved_input_shape, cfg.resolved_num_classes
  if cfg.library is None:
    model, variables = ckpt.load_model(cfg.model, cfg.checkpoint, shape, classes)
    return ModelSource("checkpoint", model, variables, shape, classes, variables)
  meta = library_io.read_library(cfg.library)
  check_library_config(cfg, meta, cfg.library)
  model = models_lib.get_model(cfg.model, input_shape=shape, num_classes=classes)
  template = models_lib.abstract_variables(model, shape)
  template = {"params": template["params"], "batch_stats": template.get("batch_stats", {})}
  ratios = tuple(float(p) for p in cfg.keep_choices)
  if not any(abs(p - library_io.DENSE_KEEP) <= schemes.KEEP_MATCH_TOLERANCE for p in ratios):
    ratios = ratios + (library_io.DENSE_KEEP,)
  entries = [library_io.load_entry(cfg.library, p, template, meta)
             for p in tqdm(ratios, disable=not progress, desc="load library", unit="model")]
  dense = entries[int(np.argmin([abs(p - library_io.DENSE_KEEP) for p in ratios]))]
  return ModelSource("library", model, schemes.stack_variables(entries), shape, classes,
                     dense, ratios, cfg.library, meta)


def make_scheme(cfg: SearchConfig, source: ModelSource, calibration=None,
                tables=None) -> schemes.QuantScheme:
  """The quantization scheme of a config and source (``schemes.py``).

  ``tables``: the config's calibration tables (``tables.py``; None for ``minmax``).
  """
  if source.kind == "library":
    return schemes.library(source.ratios, cfg.weight_quant, cfg.activation_format,
                           cfg.placement, cfg.weight_range)
  return schemes.ptq(calibration, cfg.weight_quant, cfg.activation_format, cfg.placement,
                     cfg.weight_range, cfg.act_quant, tables)


def calibration_tables(cfg: SearchConfig, source: ModelSource, images, calibration,
                       batch_size: int):
  """The config's cached calibration tables (``tables.load_or_compute``), or None."""
  if source.kind != "checkpoint" or cfg.calibration == "minmax":
    return None
  extra = (cfg.fixed_act_bits,) if cfg.activation_format == "int" else ()
  return tables_lib.load_or_compute(
      None, cfg.calibration, source.model, source.variables, images,
      tables_lib.table_bits(cfg.bit_choices, extra), calibration, batch_size,
      placement=cfg.placement, weight_quant=cfg.weight_quant, weight_range=cfg.weight_range,
      act_quant=cfg.act_quant, activations=cfg.activation_format == "int")


def search_space(cfg: SearchConfig, workload) -> SearchSpace:
  num_nodes = workload.num_quantizers
  if cfg.quantize_activations:
    active = tuple(range(num_nodes))
  else:
    active = tuple(int(n) for n in np.nonzero(workload.node_kind == workload_lib.KIND_WEIGHT)[0])
  return SearchSpace(num_nodes=num_nodes, active_nodes=active,
                     num_choices=len(cfg.bit_choices), num_keep=len(cfg.keep_choices))


def cost_names_of(cfg: SearchConfig) -> tuple[str, ...]:
  """Costs a run computes: ``model_ratio`` and ``bops_ratio`` always, then the rest."""
  wanted = ("model_ratio", "bops_ratio") + tuple(cfg.objectives) + tuple(cfg.constraints)
  return tuple(n for n in dict.fromkeys(wanted) if n not in ACCURACY_OBJECTIVES)


def data_splits(data) -> dict:
  """In-memory data as ``{split: (images float32 [N, H, W, C], labels int32 [N])}``.

  Args:
    data: ``(images, labels)`` (the split ``"train"``: fitness subset and calibration)
      or ``{"train": (images, labels), "test": (images, labels)}`` (``"test"`` is where
      the final front is re-evaluated). Images are used as given (preprocessed).

  Raises:
    ValueError naming the split and the problem.
  """
  if isinstance(data, (tuple, list)):
    data = {"train": data}
  if not isinstance(data, Mapping) or not data:
    raise ValueError(f"data: got {type(data).__name__}; allowed: (images, labels) or "
                     f"{{split: (images, labels)}} with splits in {IN_MEMORY_SPLITS}")
  out = {}
  for split, pair in data.items():
    if split not in IN_MEMORY_SPLITS:
      raise ValueError(f"data: split {split!r} is invalid; allowed: {IN_MEMORY_SPLITS}")
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
      raise ValueError(f"data[{split!r}]: got {type(pair).__name__}; allowed: a pair "
                       "(images, labels)")
    images, labels = np.asarray(pair[0]), np.asarray(pair[1])
    if images.ndim != 4 or len(images) < 1:
      raise ValueError(f"data[{split!r}]: images of shape {images.shape}; allowed: "
                       "[N, H, W, C] with N >= 1")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) \
        or labels.min() < 0:
      raise ValueError(f"data[{split!r}]: labels of shape {labels.shape} / dtype "
                       f"{labels.dtype}; allowed: non-negative integers [{len(images)}]")
    out[split] = (images.astype(np.float32), labels.astype(np.int32))
  shapes = {s: x.shape[1:] for s, (x, _) in out.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"data: image shapes differ between splits {shapes}; allowed: one shape")
  return out


def split_arrays(cfg: SearchConfig, split: str, data: Mapping | None = None):
  """``(images preprocessed, labels)`` of a split: from files, or ``data`` (``"arrays"``)."""
  if cfg.dataset != IN_MEMORY_DATASET:
    images, labels = data_lib.load_split(cfg.dataset, split, source_dir=cfg.data_dir)
    return data_lib.preprocess(cfg.dataset, images), labels
  if data is None:
    raise ValueError("dataset='arrays': pass data= to nemo_jax.search / build_problem "
                     "(the in-memory splits are not stored with the run)")
  if split not in data:
    raise ValueError(f"split {split!r} is not in data (splits {sorted(data)}); allowed: "
                     f"one of {sorted(data)} (eval_split / final_split)")
  return data[split]


IMAGE_SETS = ("fitness", "calibration", "selection")
"""The image sets a search draws from ``eval_split``, in drawing order (disjoint)."""
IMAGE_SET_FIELDS = ("eval_per_class", "calib_per_class", "selection_per_class")
"""The config field giving each set's images per class."""


def image_sets(cfg: SearchConfig, labels) -> dict[str, np.ndarray]:
  """Indices of the fitness, calibration and selection images among ``eval_split``'s.

  Pure: ``data.disjoint_stratified_subsets`` of the labels, with the sizes of
  ``IMAGE_SET_FIELDS`` and the config's seed (fitness ``seed``, calibration ``seed + 1``,
  selection ``seed + 2``, each from the images the sets before it left), so no image is
  in two sets and the fitness and calibration images do not depend on
  ``selection_per_class`` (``docs/DESIGN.md``, "Image sets").

  Args:
    cfg: the search config.
    labels: the labels of ``eval_split`` ``[N]``.

  Returns:
    ``{name: sorted int64 indices}`` for every name of ``IMAGE_SETS``.

  Raises:
    ValueError naming the field and the numbers: a class of ``eval_split`` with fewer
    images than the sets ask for.
  """
  try:
    idx = data_lib.disjoint_stratified_subsets(
        labels, [getattr(cfg, f) for f in IMAGE_SET_FIELDS], cfg.seed, names=IMAGE_SET_FIELDS)
  except ValueError as e:
    raise ValueError(f"{e} (images of eval_split={cfg.eval_split!r})") from None
  return dict(zip(IMAGE_SETS, idx))


def eval_split_sets(cfg: SearchConfig, data: Mapping | None = None,
                    names: Sequence[str] = IMAGE_SETS) -> dict:
  """``{name: (images preprocessed, labels)}`` of the image sets ``names`` (``image_sets``).

  Every set's size is checked (a class too small is an error even if its set is not
  asked for); only the sets named are preprocessed.
  """
  if cfg.dataset != IN_MEMORY_DATASET:
    images, labels = data_lib.load_split(cfg.dataset, cfg.eval_split, source_dir=cfg.data_dir)
    pre = lambda x: data_lib.preprocess(cfg.dataset, x)
  else:
    (images, labels), pre = split_arrays(cfg, cfg.eval_split, data), lambda x: x
  idx = image_sets(cfg, labels)
  return {n: (pre(images[idx[n]]), labels[idx[n]]) for n in names}


def fitness_data(cfg: SearchConfig, data: Mapping | None = None):
  """``(x_fitness, y_fitness, x_calibration)``: disjoint stratified subsets of ``eval_split``."""
  sets = eval_split_sets(cfg, data, ("fitness", "calibration"))
  return (*sets["fitness"], sets["calibration"][0])


def selection_data(cfg: SearchConfig, data: Mapping | None = None):
  """``(images, labels)`` of the selection set, or None with ``selection_per_class=0``."""
  if cfg.selection_per_class == 0:
    return None
  return eval_split_sets(cfg, data, ("selection",))["selection"]


# --------------------------------------------------------------------------- problem


@dataclasses.dataclass
class Problem:
  """Everything needed to score configurations (built by :func:`build_problem`)."""
  cfg: SearchConfig
  source: ModelSource
  workload: Any
  graph: Any
  space: SearchSpace
  scheme: schemes.QuantScheme
  evaluator: Any
  calibration: Any
  costs_registry: CostRegistry
  cost_names: tuple[str, ...]
  fp32_costs: dict
  bit_choices: jnp.ndarray
  keep_choices: jnp.ndarray
  data: Mapping | None = None   # in-memory splits (dataset "arrays"), data_splits()

  @property
  def model(self):
    return self.source.model

  @property
  def needs_accuracy(self) -> bool:
    names = tuple(self.cfg.objectives) + tuple(self.cfg.constraints)
    return any(n in ACCURACY_OBJECTIVES for n in names)

  @property
  def objective_names(self) -> tuple[str, ...]:
    return self.cfg.objectives

  @property
  def num_objectives(self) -> int:
    return len(self.cfg.objectives)

  def decode(self, choice_idx, keep_idx) -> QuantConfig:
    """Choice indices ``[..., num_active]`` + keep index ``[...]`` -> QuantConfig (jnp)."""
    bits_active = self.bit_choices[choice_idx]
    lead = choice_idx.shape[:-1]
    nodes = jnp.full(lead + (self.space.num_nodes,), self.cfg.act_fill_bits, jnp.int32)
    nodes = nodes.at[..., jnp.asarray(self.space.active_nodes)].set(bits_active)
    w_bits, a_bits = self.workload.split_node_bits(nodes)
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, keep=self.keep_choices[keep_idx])

  def configs(self, keep: Sequence[float], w_bits, a_bits=None) -> QuantConfig:
    """A validated ``QuantConfig [P]`` from host values (reports, baselines, users).

    Args:
      keep: keep ratios ``[P]`` (for a library: among its ratios).
      w_bits: weight bits ``[P, L]`` (or ``[L]`` for every member).
      a_bits: activation bits ``[P, La]``; default: the config's non-searched width.

    Raises:
      ValueError: a keep ratio the source cannot evaluate, or bit-widths outside the
        search space (``bit_choices``; 32 = float is always allowed).
    """
    keep = np.asarray(keep, np.float64).reshape(-1)
    w = np.asarray(w_bits)
    if w.ndim == 1:
      w = np.tile(w[None], (len(keep), 1))
    La = self.workload.num_act_quantizers
    a = (np.full((len(w), La), self.cfg.act_fill_bits) if a_bits is None
         else np.asarray(a_bits))
    cfg = self.cfg
    a_allowed = tuple(cfg.bit_choices) + (cfg.act_fill_bits,) if cfg.quantize_activations \
        else (cfg.act_fill_bits,)
    return validate_configs(QuantConfig(w_bits=w, a_bits=a, keep=keep),
                            self.workload.num_layers, self.workload.layer_names,
                            population=True, allowed_keep=self.scheme.allowed_keep,
                            allowed_bits={"w_bits": cfg.bit_choices, "a_bits": a_allowed},
                            num_act_quantizers=La, act_names=self.workload.act_names)

  def costs(self, configs: QuantConfig) -> dict:
    """All cost quantities needed, ``{name: [P]}`` in their own units (jitted)."""
    values = make_objectives_fn(self.workload, self.cost_names, self.costs_registry)(configs)
    return {n: values[:, j] for j, n in enumerate(self.cost_names)}

  def make_evaluator(self, images, labels) -> Evaluator:
    """An evaluator of this problem's configurations on other (preprocessed) data."""
    cfg = self.cfg
    return Evaluator(self.source.model, self.source.variables, self.scheme, images, labels,
                     batch_size=cfg.eval_batch_size, population_pad=population_pad(cfg),
                     strategy=cfg.eval_strategy)

  def accuracy(self, configs: QuantConfig, evaluator: Evaluator | None = None,
               pad_to: int | None = None):
    """Top-1 / top-5 error ``[P]`` (float64, host) on the fitness subset (or ``evaluator``'s).

    ``pad_to``: evaluate as that many members (``Evaluator.run``).
    """
    result = (evaluator or self.evaluator).run(configs, pad_to=pad_to)
    return {"top1_error": 1.0 - np.asarray(result.top1, np.float64),
            "top5_error": 1.0 - np.asarray(result.top5, np.float64)}

  def objectives(self, configs: QuantConfig, timed: bool = False, pad_to: int | None = None):
    """``(F [P, M] normalised, violation [P], raw {name: [P]})``; see module doc.

    With ``timed=True`` a fourth value gives the seconds spent in the accuracy call;
    ``pad_to`` is passed to the evaluator (``Evaluator.run``).
    """
    raw = {k: np.asarray(x, np.float64) for k, x in self.costs(configs).items()}
    acc_seconds = 0.0
    if self.needs_accuracy:
      t0 = time.perf_counter()
      raw.update(self.accuracy(configs, pad_to=pad_to))
      acc_seconds = time.perf_counter() - t0
    F = np.stack([self.normalise(n, raw[n]) for n in self.cfg.objectives], axis=-1)
    violation = np.zeros(F.shape[0])
    for name, bound in self.cfg.constraints.items():
      scale = self.fp32_costs.get(name, 1.0)
      violation += np.maximum(raw[name] - bound, 0.0) / scale
    out = (F.astype(np.float32), violation.astype(np.float32), raw)
    return out + (acc_seconds,) if timed else out

  def normalise(self, name: str, values):
    if name in ACCURACY_OBJECTIVES:
      return values
    return values / self.fp32_costs[name]


def cheapest_config(cfg: SearchConfig, workload) -> QuantConfig:
  """The configuration with the smallest bits and keep of the search space ``[1]``."""
  a = min(cfg.bit_choices) if cfg.quantize_activations else cfg.act_fill_bits
  return QuantConfig(w_bits=jnp.full((1, workload.num_layers), min(cfg.bit_choices), jnp.int32),
                     a_bits=jnp.full((1, workload.num_act_quantizers), a, jnp.int32),
                     keep=jnp.asarray([min(cfg.keep_choices)], jnp.float32))


def check_cost_bounds(cfg: SearchConfig, workload, registry: CostRegistry) -> None:
  """Rejects cost bounds that no configuration of the search space can meet.

  Every built-in cost grows with every bit-width and the keep ratio, so the cheapest
  configuration (every searched quantizer at the smallest bit choice, the smallest
  keep) has the smallest value; if it exceeds a bound, nothing can meet it. Bounds on
  accuracy or on user costs are checked during the search instead (after generation 0).

  Raises:
    ValueError naming the bound, the closest (cheapest) configuration and its value.
  """
  names = [n for n in cfg.constraints if n not in ACCURACY_OBJECTIVES and registry.is_builtin(n)]
  if not names:
    return
  cheapest = cheapest_config(cfg, workload)
  values = np.asarray(make_objectives_fn(workload, tuple(names), registry)(cheapest))[0]
  for name, value in zip(names, values):
    bound = cfg.constraints[name]
    if value > bound:
      raise ValueError(
          f"constraints[{name!r}]={bound!r} cannot be met by any configuration: the closest "
          f"one (all weights at {min(cfg.bit_choices)} bits, keep {min(cfg.keep_choices)}) has "
          f"{name}={float(value):.6g}; allowed: a bound >= {float(value):.6g}")


def build_problem(cfg: SearchConfig, registries: Registries | None = None,
                  progress: bool = True, model=None, variables=None,
                  data=None) -> Problem:
  """Composes the problem of a validated search config (module docstring).

  Args:
    cfg: a validated SearchConfig (``load_search_config``).
    registries: costs / custom species beyond the built-ins (the config's own plugins
      are added).
    progress: show progress bars (library loading).
    model, variables: a user's linen model and its float variables (with
      ``cfg.model == "custom"``; quantized by interception, ``intercept.py``).
    data: in-memory splits (with ``cfg.dataset == "arrays"``), see :func:`data_splits`.

  Raises:
    ValueError: a checkpoint or library that does not match the config, a user model
      with unhandled quantizable parameters, or a cost bound no configuration can meet.
  """
  registries = search_registries(cfg, registries)
  data = None if data is None else data_splits(data)
  source = load_model_source(cfg, progress=progress, model=model, variables=variables)
  workload = workload_lib.extract_workload(
      source.model if is_user_model(cfg.model) else cfg.model, source.input_shape,
      source.num_classes, cfg.placement)
  check_cost_bounds(cfg, workload, registries.costs)
  graph = graph_lib.workload_graph(workload, edges=cfg.edges)
  if cfg.node_features is not None:
    names = graph_lib.feature_names(workload)
    missing = [f for f in cfg.node_features if f not in names]
    if missing:
      raise ValueError(f"node_features: {missing} do not exist for this workload "
                       f"({cfg.placement} placement); allowed: {list(names)}")
    columns = [names.index(f) for f in cfg.node_features]
    graph = graph._replace(nodes=graph.nodes[:, np.asarray(columns)])
  space = search_space(cfg, workload)

  x_eval, y_eval, x_calib = fitness_data(cfg, data)
  calibration = None
  batch = max(1, len(x_calib) // cfg.calib_batches)
  if source.kind == "checkpoint" and cfg.activation_format == "int":
    calibration = calib_lib.load_or_calibrate(None, source.model, source.variables, x_calib,
                                              batch_size=batch, placement=cfg.placement)
  tables = calibration_tables(cfg, source, x_calib, calibration, batch)
  scheme = make_scheme(cfg, source, calibration, tables)
  evaluator = Evaluator(source.model, source.variables, scheme, x_eval, y_eval,
                        batch_size=cfg.eval_batch_size, population_pad=population_pad(cfg),
                        strategy=cfg.eval_strategy)

  cost_names = cost_names_of(cfg)
  fp32 = jax.tree.map(lambda x: x[None], QuantConfig.uniform(
      workload.num_layers, num_act_quantizers=workload.num_act_quantizers))
  fp32_values = np.asarray(make_objectives_fn(workload, cost_names, registries.costs)(fp32))[0]
  return Problem(cfg=cfg, source=source, workload=workload, graph=graph, space=space,
                 scheme=scheme, evaluator=evaluator, calibration=calibration,
                 costs_registry=registries.costs, cost_names=cost_names,
                 fp32_costs={n: float(x) for n, x in zip(cost_names, fp32_values)},
                 bit_choices=jnp.asarray(cfg.bit_choices, jnp.int32),
                 keep_choices=jnp.asarray(cfg.keep_choices, jnp.float32), data=data)
