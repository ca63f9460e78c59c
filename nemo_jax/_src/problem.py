"""The optimisation problem, composed once per run: model source + scheme + data + costs.

:func:`build_problem` composes three independent choices of a search config
(``docs/DESIGN.md``, "Problem"):

1. the model source (:func:`load_model_source`): a float checkpoint (NEMO) or an EMOMC
   library of pre-pruned models (``library=DIR``);
2. the quantization scheme (``schemes.ptq`` for a checkpoint, ``schemes.library`` for
   a library), with the config's ``weight_quant`` and ``activation_format``; integer
   activations are calibrated (cached by fingerprint, ``calibration.py``);
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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nemo_jax._src import calibration as calib_lib
from nemo_jax._src import checkpoint as ckpt
from nemo_jax._src import data as data_lib
from nemo_jax._src import graph as graph_lib
from nemo_jax._src import models as models_lib
from nemo_jax._src import quant
from nemo_jax._src import schemes
from nemo_jax._src import workload as workload_lib
from nemo_jax._src.config import QuantConfig, validate_configs
from nemo_jax._src.costs.registry import CostRegistry, make_objectives_fn
from nemo_jax._src.emomc import io as library_io
from nemo_jax._src.evaluator import Evaluator
from nemo_jax._src.registries import Registries
from nemo_jax._src.search.config import ACCURACY_OBJECTIVES, SearchConfig, search_registries
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


def load_model_source(cfg: SearchConfig, progress: bool = True) -> ModelSource:
  """The checkpoint or library of a search config.

  A library source stacks the entries of ``keep_choices`` plus the dense model (the
  report's quantization-only baseline, p = 1): ``(K + 1) * 4 * params`` bytes resident
  (VGG-16 with the 61 ratios 0.20..0.80: ~3.6 GB).
  """
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


def make_scheme(cfg: SearchConfig, source: ModelSource, calibration=None) -> schemes.QuantScheme:
  """The quantization scheme of a config and source (``schemes.py``)."""
  if source.kind == "library":
    return schemes.library(source.ratios, cfg.weight_quant, cfg.activation_format,
                           cfg.placement)
  return schemes.ptq(calibration, cfg.weight_quant, cfg.activation_format, cfg.placement)


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


def fitness_data(cfg: SearchConfig):
  """``(x_fitness, y_fitness, x_calibration)``: stratified subsets of ``eval_split``."""
  images, labels = data_lib.load_split(cfg.dataset, cfg.eval_split, source_dir=cfg.data_dir)
  eval_idx = data_lib.stratified_subset(labels, cfg.eval_per_class, seed=cfg.seed)
  calib_idx = data_lib.stratified_subset(labels, cfg.calib_per_class, seed=cfg.seed + 1)
  return (data_lib.preprocess(cfg.dataset, images[eval_idx]), labels[eval_idx],
          data_lib.preprocess(cfg.dataset, images[calib_idx]))


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

  def accuracy(self, configs: QuantConfig, evaluator: Evaluator | None = None):
    """Top-1 / top-5 error ``[P]`` (float64, host) on the fitness subset (or ``evaluator``'s)."""
    result = (evaluator or self.evaluator).run(configs)
    return {"top1_error": 1.0 - np.asarray(result.top1, np.float64),
            "top5_error": 1.0 - np.asarray(result.top5, np.float64)}

  def objectives(self, configs: QuantConfig, timed: bool = False):
    """``(F [P, M] normalised, violation [P], raw {name: [P]})``; see module doc.

    With ``timed=True`` a fourth value gives the seconds spent in the accuracy call.
    """
    raw = {k: np.asarray(x, np.float64) for k, x in self.costs(configs).items()}
    acc_seconds = 0.0
    if self.needs_accuracy:
      t0 = time.perf_counter()
      raw.update(self.accuracy(configs))
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
                  progress: bool = True) -> Problem:
  """Composes the problem of a validated search config (module docstring).

  Args:
    cfg: a validated SearchConfig (``load_search_config``).
    registries: costs / custom species beyond the built-ins (the config's own plugins
      are added).
    progress: show progress bars (library loading).

  Raises:
    ValueError: a checkpoint or library that does not match the config, or a cost bound
      no configuration can meet.
  """
  registries = search_registries(cfg, registries)
  source = load_model_source(cfg, progress=progress)
  workload = workload_lib.extract_workload(cfg.model, source.input_shape, source.num_classes,
                                           cfg.placement)
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

  x_eval, y_eval, x_calib = fitness_data(cfg)
  calibration = None
  if source.kind == "checkpoint" and cfg.activation_format == "int":
    batch = max(1, len(x_calib) // cfg.calib_batches)
    calibration = calib_lib.load_or_calibrate(None, source.model, source.variables, x_calib,
                                              batch_size=batch, placement=cfg.placement)
  scheme = make_scheme(cfg, source, calibration)
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
                 keep_choices=jnp.asarray(cfg.keep_choices, jnp.float32))
