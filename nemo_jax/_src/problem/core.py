"""The optimisation problem, composed once per run: model source + scheme + data + costs.

:func:`compose_problem` composes three independent choices of a problem section
(``docs/DESIGN.md``, "Problem"):

1. the model source (``sources.load_model_source``): a float checkpoint (NEMO), an EMOMC
   library of pre-pruned models (``library=DIR``) or a user's model;
2. the quantization scheme (by name from a scheme registry: ``ptq`` for a checkpoint,
   ``library`` for a library), with the section's :class:`~nemo_jax._src.spec.QuantSpec`;
   integer activations are calibrated (cached by fingerprint, ``calibration.py``) and a
   ``calibration`` other than ``minmax`` gets its per-bit tables (``tables.py``, cached
   the same way);
3. the cost names (objectives + constraints + the always-reported ``model_ratio`` and
   ``bops_ratio``) from a cost registry.

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
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax._src import calibration as calib_lib
from nemo_jax._src import checkpoint as ckpt
from nemo_jax._src import schemes as schemes_lib
from nemo_jax._src import tables as tables_lib
from nemo_jax._src import workload as workload_lib
from nemo_jax._src.costs.registry import CostRegistry, make_objectives_fn
from nemo_jax._src.evaluator import Evaluator
from nemo_jax._src.models import ModelRegistry
from nemo_jax._src.problem.config import ACCURACY_OBJECTIVES, ProblemConfig, is_user_model
from nemo_jax._src.problem.images import data_splits, fitness_data
from nemo_jax._src.problem.sources import ModelSource, load_model_source
from nemo_jax._src.problem.space import SearchSpace, search_space
from nemo_jax._src.qconfig import QuantConfig, validate_configs


def population_pad(population: int) -> int:
  """Members per device such that one padded shape serves every batch of <= population
  configs (generations, uniform baselines, final re-evaluation chunks)."""
  return -(-population // jax.device_count())


def make_scheme(cfg: ProblemConfig, source: ModelSource, calibration=None, tables=None,
                schemes: Mapping[str, Any] | None = None) -> schemes_lib.QuantScheme:
  """The quantization scheme of a problem section and source (``schemes.py``).

  ``schemes``: name -> ``schemes.SchemeBuilder`` (default ``schemes.BUILTIN_SCHEMES``);
  ``tables``: the calibration tables (``tables.py``; None for ``minmax``).
  """
  builders = schemes_lib.BUILTIN_SCHEMES if schemes is None else schemes
  return builders[cfg.scheme_name](source, cfg.quant, calibration, tables)


def calibration_tables(cfg: ProblemConfig, source: ModelSource, images, calibration,
                       batch_size: int, progress: bool = False):
  """The section's cached calibration tables (``tables.load_or_compute``), or None."""
  if source.kind != "checkpoint" or cfg.quant.calibration == "minmax":
    return None
  extra = (cfg.fixed_act_bits,) if cfg.quant.int_activations else ()
  return tables_lib.load_or_compute(
      None, cfg.quant, source.model, source.variables, images,
      tables_lib.table_bits(cfg.bit_choices, extra), calibration, batch_size,
      progress=progress)


class AccuracyCache:
  """The fitness accuracy of every configuration scored, keyed on its decoded bits and keep.

  The fitness images and the evaluator are fixed for a problem and the evaluation is
  deterministic, so a configuration proposed again (by another species, a later
  generation, or another search on the same problem) costs nothing: its scores are
  the ones the evaluator gave it the first time, bit for bit.

  Attributes:
    table: ``{key: (top1_error, top5_error)}``.
    hits, misses: lookups answered from the table / evaluated.
  """

  def __init__(self):
    self.table: dict[bytes, tuple[float, float]] = {}
    self.hits = 0
    self.misses = 0

  @staticmethod
  def keys(configs: QuantConfig) -> list[bytes]:
    """One key per member: its weight bits, activation bits and keep ratio."""
    w = np.asarray(configs.w_bits, np.int32)
    a = np.asarray(configs.a_bits, np.int32)
    keep = np.broadcast_to(np.asarray(configs.keep, np.float32), w.shape[:1])
    return [w[i].tobytes() + a[i].tobytes() + keep[i].tobytes() for i in range(len(w))]


@dataclasses.dataclass
class Problem:
  """Everything needed to score configurations (built by :func:`compose_problem`).

  Attributes:
    cfg: the problem section.
    seed: the run's seed (it drew the fitness and calibration images).
    population: the generation size the evaluator is padded for.
    source, workload, space, scheme, evaluator, calibration: the composed parts.
    costs_registry, cost_names, fp32_costs: the costs computed, and the FP32 model's.
    bit_choices, keep_choices: the section's choices as device arrays (decode).
    data: in-memory splits (dataset ``"arrays"``, ``images.data_splits``) or None.
    cache: the fitness accuracy of every configuration scored (:class:`AccuracyCache`).
    held_out: ``(per_class, seed)`` of the ``eval_split`` images the checkpoint was not
      trained on (its metadata; the selection images come from them only), or None.
  """
  cfg: ProblemConfig
  seed: int
  population: int
  source: ModelSource
  workload: Any
  space: SearchSpace
  scheme: schemes_lib.QuantScheme
  evaluator: Any
  calibration: Any
  costs_registry: CostRegistry
  cost_names: tuple[str, ...]
  fp32_costs: dict
  bit_choices: jnp.ndarray
  keep_choices: jnp.ndarray
  data: Mapping | None = None
  cache: AccuracyCache = dataclasses.field(default_factory=AccuracyCache)
  held_out: tuple[int, int] | None = None

  @property
  def model(self):
    return self.source.model

  @property
  def needs_accuracy(self) -> bool:
    return self.cfg.needs_accuracy

  @property
  def objective_names(self) -> tuple[str, ...]:
    return self.cfg.objectives

  @property
  def num_objectives(self) -> int:
    return len(self.cfg.objectives)

  @property
  def raw_names(self) -> tuple[str, ...]:
    """The raw quantities stored per member: the costs, then the accuracy errors."""
    return self.cost_names + (ACCURACY_OBJECTIVES if self.needs_accuracy else ())

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
      a_bits: activation bits ``[P, La]``; default: the section's non-searched width.

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
                     batch_size=cfg.eval_batch_size,
                     population_pad=population_pad(self.population),
                     strategy=cfg.eval_strategy)

  def accuracy(self, configs: QuantConfig, evaluator: Evaluator | None = None,
               pad_to: int | None = None):
    """Top-1 / top-5 error ``[P]`` (float64, host) on the fitness subset (or ``evaluator``'s).

    On the fitness subset, only configurations the problem has not scored before are
    evaluated (:class:`AccuracyCache`), in one call of the compiled function for the
    whole population's size. ``pad_to``: evaluate as that many members
    (``Evaluator.run``).
    """
    if evaluator is not None:
      result = evaluator.run(configs, pad_to=pad_to)
      return {"top1_error": 1.0 - np.asarray(result.top1, np.float64),
              "top5_error": 1.0 - np.asarray(result.top5, np.float64)}
    keys = self.cache.keys(configs)
    todo = list(dict.fromkeys(k for k in keys if k not in self.cache.table))
    self.cache.hits += len(keys) - len(todo)
    self.cache.misses += len(todo)
    if todo:
      first = {k: i for i, k in reversed(list(enumerate(keys)))}
      rows = np.asarray([first[k] for k in todo])
      subset = jax.tree.map(lambda x: np.asarray(x)[rows] if np.ndim(x) else x, configs)
      size = pad_to if pad_to is not None else self.evaluator.padded_size(len(keys))
      result = self.evaluator.run(subset, pad_to=size)
      top1, top5 = np.asarray(result.top1, np.float64), np.asarray(result.top5, np.float64)
      for j, k in enumerate(todo):
        self.cache.table[k] = (1.0 - top1[j], 1.0 - top5[j])
    errors = np.asarray([self.cache.table[k] for k in keys], np.float64).reshape(-1, 2)
    return {"top1_error": errors[:, 0], "top5_error": errors[:, 1]}

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


def cheapest_config(cfg: ProblemConfig, workload) -> QuantConfig:
  """The configuration with the smallest bits and keep of the search space ``[1]``."""
  a = min(cfg.bit_choices) if cfg.quantize_activations else cfg.act_fill_bits
  return QuantConfig(w_bits=jnp.full((1, workload.num_layers), min(cfg.bit_choices), jnp.int32),
                     a_bits=jnp.full((1, workload.num_act_quantizers), a, jnp.int32),
                     keep=jnp.asarray([min(cfg.keep_choices)], jnp.float32))


def check_cost_bounds(cfg: ProblemConfig, workload, registry: CostRegistry) -> None:
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


def float_predictions(source: ModelSource, images, batch_size: int) -> np.ndarray:
  """The float model's top-1 class of every image (label-free fitness, ``fitness_labels``)."""
  dense = source.dense_variables
  predict = jax.jit(lambda v, x: jnp.argmax(source.model.apply(v, x, None, train=False), -1))
  out = [np.asarray(predict(dense, jnp.asarray(images[s:s + batch_size])))
         for s in range(0, len(images), batch_size)]
  return np.concatenate(out).astype(np.int32)


def held_out_images(cfg: ProblemConfig, selection_per_class: int) -> tuple[int, int] | None:
  """``(per_class, seed)`` of the ``eval_split`` images the checkpoint was not trained on.

  Read from the checkpoint's training metadata (``checkpoint.training_images``). When the
  checkpoint was trained on the whole ``eval_split`` and a selection set is asked for, its
  images are training images of the model: a loud warning says so (``selection_top1``
  is then in sample). A checkpoint without metadata (converted) is not checked.
  """
  if is_user_model(cfg.model) or cfg.library is not None:
    return None
  trained = ckpt.training_images(cfg.checkpoint, cfg.model)
  if (trained is None or cfg.eval_split != trained["split"]
      or not ckpt.same_data(trained["dataset"], cfg.dataset)):
    return None
  if trained["held_out_per_class"] > 0:
    return trained["held_out_per_class"], trained["held_out_seed"]
  if selection_per_class > 0:
    msg = (f"selection_per_class={selection_per_class}: checkpoint={cfg.checkpoint!r} was "
           f"trained on every image of eval_split={cfg.eval_split!r}, so the selection "
           "images are training images of the model (selection_top1 is in sample); allowed: "
           "a checkpoint trained with held_out_per_class > 0 (nemo-jax train)")
    warnings.warn(msg, stacklevel=3)
  return None


def compose_problem(cfg: ProblemConfig, *, seed: int = 0, population: int = 32,
                    selection_per_class: int = 0, costs: CostRegistry | None = None,
                    models: ModelRegistry | None = None,
                    schemes: Mapping[str, Any] | None = None, progress: bool = True,
                    model=None, variables=None, data=None) -> Problem:
  """Composes the problem of a validated problem section (module docstring).

  Args:
    cfg: a validated :class:`ProblemConfig`.
    seed: the run's seed (draws the fitness and calibration images).
    population: the generation size (the evaluator's padded shape).
    selection_per_class: the run's selection images per class (drawn after the fitness
      and calibration images, so it does not change them; checked here so that a class
      too small for all three sets is an error before any work).
    costs, models, schemes: the registries (default: the built-ins).
    progress: show progress bars (library loading, calibration, tables).
    model, variables: a user's linen model and its float variables, or an NNX module
      (variables optional) (with ``cfg.model == "custom"``; quantized by interception,
      ``intercept.py`` / ``nnx_models.py``).
    data: in-memory splits (with ``cfg.dataset == "arrays"``), see ``images.data_splits``.

  Raises:
    ValueError: a checkpoint or library that does not match the section, a user model
      with unhandled quantizable parameters, or a cost bound no configuration can meet.
  """
  costs = costs if costs is not None else CostRegistry.default()
  data = None if data is None else data_splits(data)
  source = load_model_source(cfg, progress=progress, model=model, variables=variables,
                             models=models)
  workload = workload_lib.extract_workload(
      source.model if is_user_model(cfg.model) else cfg.model, source.input_shape,
      source.num_classes, cfg.quant.placement, registry=models)
  check_cost_bounds(cfg, workload, costs)
  space = search_space(workload, cfg.quantize_activations, len(cfg.bit_choices),
                       len(cfg.keep_choices))

  held_out = held_out_images(cfg, selection_per_class)
  x_eval, y_eval, x_calib = fitness_data(cfg, seed, selection_per_class, data, held_out)
  if cfg.fitness_labels == "float":
    y_eval = float_predictions(source, x_eval, cfg.eval_batch_size)
  calibration = None
  batch = max(1, len(x_calib) // cfg.calib_batches)
  if source.kind == "checkpoint" and cfg.quant.int_activations:
    calibration = calib_lib.load_or_calibrate(None, source.model, source.variables, x_calib,
                                              batch_size=batch, placement=cfg.quant.placement,
                                              progress=progress)
  tables = calibration_tables(cfg, source, x_calib, calibration, batch, progress)
  scheme = make_scheme(cfg, source, calibration, tables, schemes)
  evaluator = Evaluator(source.model, source.variables, scheme, x_eval, y_eval,
                        batch_size=cfg.eval_batch_size, population_pad=population_pad(population),
                        strategy=cfg.eval_strategy)

  cost_names = cfg.cost_names
  fp32 = jax.tree.map(lambda x: x[None], QuantConfig.uniform(
      workload.num_layers, num_act_quantizers=workload.num_act_quantizers))
  fp32_values = np.asarray(make_objectives_fn(workload, cost_names, costs)(fp32))[0]
  return Problem(cfg=cfg, seed=seed, population=population, source=source, workload=workload,
                 space=space, scheme=scheme, evaluator=evaluator, calibration=calibration,
                 costs_registry=costs, cost_names=cost_names,
                 fp32_costs={n: float(x) for n, x in zip(cost_names, fp32_values)},
                 bit_choices=jnp.asarray(cfg.bit_choices, jnp.int32),
                 keep_choices=jnp.asarray(cfg.keep_choices, jnp.float32), data=data,
                 held_out=held_out)
