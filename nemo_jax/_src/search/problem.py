"""The optimisation problem: model + data + objectives, as one object built once per run.

``Problem.objectives(configs)`` maps a population ``QuantConfig[P]`` to

* ``F`` ``[P, M]``: the objectives, all MINIMISED and normalised so that the FP32
  model scores 1 on every cost objective (ratios to FP32) and accuracy enters as error
  in [0, 1]; NaN marks a failed evaluation (non-finite logits), which the Pareto
  toolkit ranks last;
* ``violation`` ``[P]``: total normalised constraint violation (0 = feasible);
* ``raw``: every objective and constrained quantity in its own unit (``energy:X|Y`` in
  EMOMC's 0.01 mJ, ``size_kb:csr`` in KB, ...), for reports.

Only the accuracy call leaves jit; costs are one jitted vectorised call.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax._src import checkpoint as ckpt
from nemo_jax._src import costs as costs_lib
from nemo_jax._src import data as data_lib
from nemo_jax._src import evaluate as eval_lib
from nemo_jax._src import graph as graph_lib
from nemo_jax._src import models as models_lib
from nemo_jax._src import train as train_lib
from nemo_jax._src import workload as workload_lib
from nemo_jax._src.config import QuantConfig
from nemo_jax._src.search.config import ACCURACY_OBJECTIVES, SearchConfig
from nemo_jax._src.search.species import SearchSpace


def population_pad(cfg: SearchConfig) -> int:
  """Members per device such that one padded shape serves every batch of <= population
  configs (generations, uniform baselines, final re-evaluation chunks)."""
  return -(-cfg.population // jax.device_count())


def load_model_and_variables(cfg: SearchConfig):
  """Model, variables, input shape and number of classes for a search config."""
  info = data_lib.DATASETS[cfg.dataset]
  shape = tuple(cfg.input_shape or info.input_shape)
  classes = cfg.num_classes or info.num_classes
  if cfg.checkpoint == "default":
    model, variables = train_lib.load_default_model()
    if cfg.model != models_lib.DEFAULT_MODEL or shape != tuple(models_lib.DEFAULT_INPUT_SHAPE):
      raise ValueError(f"checkpoint='default' is the {models_lib.DEFAULT_MODEL} "
                       f"{models_lib.DEFAULT_INPUT_SHAPE} model; for model={cfg.model!r} "
                       f"input_shape={shape} give a checkpoint path")
    return model, variables, shape, classes
  if not os.path.exists(cfg.checkpoint):
    raise ValueError(f"checkpoint={cfg.checkpoint!r}: no such file; give 'default' or a "
                     "variables file written by `nemo-jax convert` / `nemo-jax train`")
  model = models_lib.get_model(cfg.model, input_shape=shape, num_classes=classes)
  variables = ckpt.load_variables(cfg.checkpoint, model, shape)
  return model, variables, shape, classes


@dataclasses.dataclass
class Problem:
  """Everything needed to score configurations (built by :func:`build_problem`)."""
  cfg: SearchConfig
  model: Any
  variables: Any
  workload: Any
  graph: Any
  space: SearchSpace
  evaluator: Any
  calibration: Any
  bit_choices: jnp.ndarray
  keep_choices: jnp.ndarray
  cost_names: tuple[str, ...]
  fp32_costs: dict

  @property
  def needs_accuracy(self) -> bool:
    names = tuple(self.cfg.objectives) + tuple(self.cfg.constraints)
    return any(n in ACCURACY_OBJECTIVES for n in names)

  @property
  def evaluation_variables(self):
    """The float variables every configuration is quantized from."""
    return self.variables

  @property
  def objective_names(self) -> tuple[str, ...]:
    return self.cfg.objectives

  @property
  def num_objectives(self) -> int:
    return len(self.cfg.objectives)

  def decode(self, choice_idx, keep_idx) -> QuantConfig:
    """Choice indices ``[..., num_active]`` + keep index ``[...]`` -> QuantConfig."""
    bits_active = self.bit_choices[choice_idx]
    lead = choice_idx.shape[:-1]
    nodes = jnp.full(lead + (self.space.num_nodes,), self.cfg.fixed_act_bits, jnp.int32)
    nodes = nodes.at[..., jnp.asarray(self.space.active_nodes)].set(bits_active)
    w_bits, a_bits = workload_lib.split_node_bits(nodes)
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, keep=self.keep_choices[keep_idx])

  def costs(self, configs: QuantConfig) -> dict:
    """All cost quantities needed, ``{name: [P]}`` in their own units (jitted)."""
    values = costs_lib.make_objectives_fn(self.workload, self.cost_names)(configs)
    return {n: values[:, j] for j, n in enumerate(self.cost_names)}

  def make_evaluator(self, images, labels):
    """An evaluator of this problem's configurations on other (preprocessed) data."""
    cfg = self.cfg
    return eval_lib.Evaluator(self.model, self.evaluation_variables, self.calibration,
                              images, labels, batch_size=cfg.eval_batch_size,
                              population_pad=population_pad(cfg), strategy=cfg.eval_strategy)

  def evaluate_with(self, evaluator, configs: QuantConfig):
    """Runs an evaluator (``EvalResult`` with top1/top5/loss ``[P]``)."""
    return evaluator(configs)

  def accuracy(self, configs: QuantConfig):
    """Top-1 / top-5 error ``[P]`` on the fitness subset (the only non-jitted step)."""
    result = self.evaluate_with(self.evaluator, configs)
    return {"top1_error": 1.0 - np.asarray(result.top1, np.float64),
            "top5_error": 1.0 - np.asarray(result.top5, np.float64)}

  def objectives(self, configs: QuantConfig, timed: bool = False):
    """``(F [P, M] normalised, violation [P], raw {name: [P]})``; see module doc.

    With ``timed=True`` a fourth value gives the seconds spent in the accuracy call.
    """
    raw = {k: np.asarray(v, np.float64) for k, v in self.costs(configs).items()}
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


def build_problem(cfg: SearchConfig, progress: bool = True) -> Problem:
  """Loads model, data, calibration (cached next to the checkpoint) and the evaluator.

  With ``cfg.library`` set, the EMOMC library problem is built instead.
  """
  if cfg.library is not None:
    from nemo_jax._src.emomc import problem as emomc_problem  # local: emomc imports this
    return emomc_problem.build_library_problem(cfg, progress=progress)
  model, variables, shape, classes = load_model_and_variables(cfg)
  workload = workload_lib.extract_workload(cfg.model, shape, classes)
  graph = graph_lib.workload_graph(workload, edges=cfg.edges)
  if cfg.node_features is not None:
    columns = [graph_lib.FEATURE_NAMES.index(f) for f in cfg.node_features]
    graph = graph._replace(nodes=graph.nodes[:, np.asarray(columns)])
  num_nodes = 2 * workload.num_layers
  if cfg.quantize_activations:
    active = tuple(range(num_nodes))
  else:
    active = tuple(i for i, (kind, _) in enumerate(workload_lib.nodes_to_config_index(workload))
                   if kind == "w")
  space = SearchSpace(num_nodes=num_nodes, active_nodes=active,
                      num_choices=len(cfg.bit_choices), num_keep=len(cfg.keep_choices))

  images, labels = data_lib.load_split(cfg.dataset, cfg.eval_split, source_dir=cfg.data_dir)
  eval_idx = data_lib.stratified_subset(labels, cfg.eval_per_class, seed=cfg.seed)
  calib_idx = data_lib.stratified_subset(labels, cfg.calib_per_class, seed=cfg.seed + 1)
  x_eval = data_lib.preprocess(cfg.dataset, images[eval_idx])
  x_calib = data_lib.preprocess(cfg.dataset, images[calib_idx])
  batch = max(1, len(calib_idx) // cfg.calib_batches)
  calibration = eval_lib.calibrate(model, variables, x_calib, batch_size=batch)
  evaluator = eval_lib.Evaluator(model, variables, calibration, x_eval, labels[eval_idx],
                                 batch_size=cfg.eval_batch_size, population_pad=population_pad(cfg),
                                 strategy=cfg.eval_strategy)
  # model_ratio and bops_ratio are always reported, whatever the objectives.
  wanted = ("model_ratio", "bops_ratio") + tuple(cfg.objectives) + tuple(cfg.constraints)
  cost_names = tuple(n for n in dict.fromkeys(wanted) if n not in ACCURACY_OBJECTIVES)
  fp32 = QuantConfig.uniform(workload.num_layers)
  fp32_pop = jax.tree.map(lambda x: x[None], fp32)
  fp32_values = np.asarray(costs_lib.make_objectives_fn(workload, cost_names)(fp32_pop))[0]
  fp32_costs = {n: float(v) for n, v in zip(cost_names, fp32_values)}
  return Problem(cfg=cfg, model=model, variables=variables, workload=workload, graph=graph,
                 space=space, evaluator=evaluator, calibration=calibration,
                 bit_choices=jnp.asarray(cfg.bit_choices, jnp.int32),
                 keep_choices=jnp.asarray(cfg.keep_choices, jnp.float32),
                 cost_names=cost_names, fp32_costs=fp32_costs)
