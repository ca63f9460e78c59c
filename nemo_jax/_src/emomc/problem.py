"""EMOMC stage II: the search problem over a library of pre-pruned models.

An individual is ``[p, q_1 .. q_L]``: one global keep ratio ``p`` (fraction of weights
KEPT) chosen among the library's ratios (the search config's ``keep_choices``) and one
weight bit-width per conv/dense layer (``bit_choices``, EMOMC: 2..12). Activations stay
in FP16 (``fixed_act_bits=16``; 32 keeps them in float32). Nothing is fine-tuned.

Evaluation of a configuration: take the library's pruned + retrained variables of
``p`` (kernels already pruned, so the context's keep is not applied again; biases and
BatchNorm are those of the retrained model), quantize every kernel symmetrically PER
TENSOR (``step = max|w| / (2^(q-1) - 1)``, integers clipped to ``+-(2^(q-1) - 1)``),
round every conv/dense input to float16, run the evaluation images.

Batching over the population (measured and chosen, see ``LibraryEvaluator``): the
library entries the search can pick are stacked once on the device as ``[K, ...]``
(plus the dense model, for the report's baselines); inside the one jitted population
map each member gathers its entry by the index of its keep ratio, so members with the
same ``p`` share one stored copy of the parameters and every population compiles once
per padded size, whatever mix of ratios it holds.
Memory: ``(K + 1) * 4 * params`` bytes resident (VGG-16 with the 61 ratios of 0.20..0.80
in steps of 0.01: ~3.6 GB), plus the Evaluator's per-member formula.

All objectives are minimised: accuracy enters as ``top1_error`` / ``top5_error``; the
costs (``energy:X|Y`` ..., ``size_kb:csr`` ...) are EMOMC's formulas at keep ``p``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nemo_jax._src import costs as costs_lib
from nemo_jax._src import data as data_lib
from nemo_jax._src import distributed
from nemo_jax._src import evaluate as eval_lib
from nemo_jax._src import graph as graph_lib
from nemo_jax._src import models as models_lib
from nemo_jax._src import quant
from nemo_jax._src import workload as workload_lib
from nemo_jax._src.config import QuantConfig
from nemo_jax._src.emomc import library as library_lib
from nemo_jax._src.layers import QContext
from nemo_jax._src.search.config import ACCURACY_OBJECTIVES, SearchConfig
from nemo_jax._src.search.problem import Problem, population_pad
from nemo_jax._src.search.species import SearchSpace

WEIGHT_QUANT = "symmetric_per_tensor"   # EMOMC: one step per tensor, max|w| / (2^(q-1) - 1)
ACTIVATION_MODES = {16: "fp16", 32: "float32"}
MIN_WEIGHT_BITS = 2                      # EMOMC's symmetric formula needs 2^(q-1) - 1 >= 1
KEEP_MATCH_TOLERANCE = 1e-6


class _KernelRecorder(QContext):
  """Float context that records every layer's kernel in execution order."""

  def __init__(self):
    super().__init__()
    self.kernels: list = []

  def quantize_kernel(self, kernel, i):
    self.kernels.append(kernel)
    return kernel


class _LibraryContext(QContext):
  """Precomputed (quantized) kernels; layer inputs rounded to float16 or left in float32."""

  def __init__(self, kernels, fp16: bool):
    super().__init__()
    self.kernels = kernels
    self.fp16 = fp16

  def quantize_input(self, x, i):
    return x.astype(jnp.float16).astype(x.dtype) if self.fp16 else x

  def quantize_kernel(self, kernel, i):
    return self.kernels[i]


def count_kernels(variables) -> int:
  return len(library_lib.kernel_leaves(variables["params"]))


def stack_variables(entries: Sequence[Any]):
  """``[K, ...]`` stack of K variable trees of the same model."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *entries)


class LibraryEvaluator(eval_lib.Evaluator):
  """Population evaluator over stacked library entries (EMOMC stage II).

  Args:
    model: the zoo model.
    entries: list of K variable trees (pruned library models), one per ratio.
    ratios: the K keep ratios (a member's ``keep`` selects its entry).
    images, labels: evaluation data (preprocessed).
    activations: ``"fp16"`` (EMOMC) or ``"float32"``.
    allowed_bits: weight bit-widths a member may use (others: ValueError); 32 (float)
      is always allowed.
    **kwargs: :class:`~nemo_jax._src.evaluate.Evaluator` options (``batch_size``,
      ``population_pad``, ``strategy``, ``chunk_size``, ``mesh``).

  Calling it with ``QuantConfig`` ``[P]`` returns top-1 / top-5 / loss ``[P]``
  (accuracy as a fraction; the search minimises the error). ``a_bits`` are ignored
  (activations per ``activations``).
  """

  def __init__(self, model, entries: Sequence[Any], ratios: Sequence[float], images, labels,
               activations: str = "fp16", allowed_bits: Sequence[int] | None = None,
               **kwargs):
    if activations not in ACTIVATION_MODES.values():
      raise ValueError(f"activations={activations!r} is invalid; allowed: "
                       f"{tuple(ACTIVATION_MODES.values())}")
    if len(entries) != len(ratios) or not entries:
      raise ValueError(f"entries: {len(entries)} variable trees for {len(ratios)} ratios; "
                       "allowed: one per ratio, at least one")
    num_layers = count_kernels(entries[0])
    dummy = eval_lib.Calibration(lo=jnp.zeros((num_layers,)), hi=jnp.ones((num_layers,)))
    super().__init__(model, entries[0], dummy, images, labels, weight_quant=WEIGHT_QUANT,
                     **kwargs)
    self.ratios = np.asarray(ratios, np.float32)
    self.activations = activations
    self.allowed_bits = None if allowed_bits is None else tuple(sorted(set(allowed_bits)))
    self.input_shape = tuple(np.shape(images)[1:])
    # The base class's data holds one float model + magnitude ranks; the library
    # evaluator needs the stacked entries instead (pruning is already in the weights).
    old = self._data
    replicated = distributed.replicated_sharding(self.mesh)
    self._data = {k: old[k] for k in ("images", "labels", "mask")}
    self._data.update(distributed.put_global(
        {"variables": stack_variables(entries), "ratios": self.ratios}, replicated))

  def _member(self, data, w_bits, a_bits, keep):
    """Top-1, top-k, loss of one configuration (traced): gather, quantize, scan."""
    del a_bits  # activations are FP16 (or float32), never integer-quantized here
    index = jnp.argmin(jnp.abs(data["ratios"] - keep))
    variables = jax.tree.map(lambda v: v[index], data["variables"])
    recorder = _KernelRecorder()
    # Only the kernels are used; XLA drops the forward pass on the zero image.
    self.model.apply(variables, jnp.zeros((1,) + self.input_shape, jnp.float32), recorder,
                     train=False)
    qkernels = [quant.quantize_weight(k, w_bits[i], WEIGHT_QUANT)
                for i, k in enumerate(recorder.kernels)]
    fp16 = self.activations == "fp16"

    def apply_fn(x):
      return self.model.apply(variables, x, _LibraryContext(qkernels, fp16), train=False)

    return eval_lib._scan_images(apply_fn, data["images"], data["labels"], data["mask"],
                                 self.top_k)

  def check(self, configs: QuantConfig) -> None:
    """Host-side check: every keep is a library ratio, every bit-width allowed.

    Raises:
      ValueError naming the offending value and the allowed ones.
    """
    keep = np.asarray(configs.keep, np.float64).reshape(-1)
    for p in keep:
      if np.min(np.abs(self.ratios.astype(np.float64) - p)) > KEEP_MATCH_TOLERANCE:
        raise ValueError(f"keep={float(p)!r} is not a ratio of this library evaluator; "
                         f"allowed: {[round(float(r), 6) for r in self.ratios]}")
    if self.allowed_bits is not None:
      w = np.asarray(configs.w_bits).reshape(-1)
      bad = [int(b) for b in w if int(b) not in self.allowed_bits and b < quant.FLOAT_BITS]
      if bad:
        raise ValueError(f"w_bits: bit-width {bad[0]} is outside the allowed bit-widths "
                         f"{list(self.allowed_bits)} (or {quant.FLOAT_BITS} = float)")

  def __call__(self, configs: QuantConfig) -> eval_lib.EvalResult:
    self.check(configs)
    return super().__call__(configs)

  def evaluate_float(self, cached: bool = True) -> eval_lib.EvalResult:
    """The densest entry with float32 weights (activations per ``activations``)."""
    if self._float_result is None or not cached:
      keep = float(self.ratios.max())
      config = QuantConfig(w_bits=jnp.full((1, self.num_layers), quant.FLOAT_BITS, jnp.int32),
                           a_bits=jnp.full((1, self.num_layers), quant.FLOAT_BITS, jnp.int32),
                           keep=jnp.asarray([keep], jnp.float32))
      self._float_result = super().__call__(config)
    return self._float_result


@dataclasses.dataclass
class LibraryProblem(Problem):
  """A search problem whose configurations pick their keep ratio from a pruned library.

  Extra attributes:
    library_dir: the library (``nemo-jax prune-library`` output).
    library_meta: its parsed ``library.json``.
    entry_ratios: ratios stacked in the evaluator (``keep_choices`` + 1.0).
    entries: the variable trees of ``entry_ratios``.
    activations: ``"fp16"`` or ``"float32"``.
    dense_variables: the unpruned trained model (entry 1.0).
  """
  library_dir: str = ""
  library_meta: dict = dataclasses.field(default_factory=dict)
  entry_ratios: tuple[float, ...] = ()
  entries: list = dataclasses.field(default_factory=list)
  activations: str = "fp16"
  dense_variables: Any = None

  @property
  def evaluation_variables(self):
    return self.dense_variables

  def make_evaluator(self, images, labels, activations: str | None = None):
    """A :class:`LibraryEvaluator` over this problem's entries for other data."""
    cfg = self.cfg
    return LibraryEvaluator(self.model, self.entries, self.entry_ratios, images, labels,
                            activations=activations or self.activations,
                            allowed_bits=cfg.bit_choices, batch_size=cfg.eval_batch_size,
                            population_pad=population_pad(cfg), strategy=cfg.eval_strategy)

  def configs(self, keep: Sequence[float], w_bits) -> QuantConfig:
    """``QuantConfig [P]`` from keep ratios ``[P]`` and weight bits ``[P, L]`` (or ``[L]``).

    Raises:
      ValueError: a keep ratio not in the library, or bits outside ``bit_choices``.
    """
    keep = np.asarray(keep, np.float64).reshape(-1)
    w = np.asarray(w_bits)
    if w.ndim == 1:
      w = np.tile(w[None], (len(keep), 1))
    L = self.workload.num_layers
    if w.shape != (len(keep), L):
      raise ValueError(f"w_bits: shape {w.shape}; allowed: [{len(keep)}, {L}]")
    for p in keep:
      if not any(abs(p - r) <= KEEP_MATCH_TOLERANCE for r in self.entry_ratios):
        raise ValueError(f"keep={float(p)!r} is not in the library {self.library_dir!r} "
                         f"(as loaded for this search); available: {list(self.entry_ratios)}")
    allowed = set(self.cfg.bit_choices) | {quant.FLOAT_BITS}
    for b in w.reshape(-1):
      if int(b) not in allowed:
        raise ValueError(f"w_bits: bit-width {int(b)} is outside the allowed bit-widths "
                         f"{list(self.cfg.bit_choices)} (or {quant.FLOAT_BITS} = float)")
    return QuantConfig(w_bits=jnp.asarray(w, jnp.int32),
                       a_bits=jnp.full(w.shape, self.cfg.fixed_act_bits, jnp.int32),
                       keep=jnp.asarray(keep, jnp.float32))


# --------------------------------------------------------------------------- building


def check_library_config(cfg: SearchConfig, meta: dict, library_dir: str) -> None:
  """Checks a search config against a library (before anything expensive runs).

  Raises:
    ValueError naming the field, the value and the allowed values: a keep ratio missing
    from the library, bit-widths below 2, searched activations, an activation width
    other than 16 (FP16) / 32 (float), or another model / input shape.
  """
  s = meta["settings"]
  if s["model"] != cfg.model:
    raise ValueError(f"model={cfg.model!r} does not match the library {library_dir!r}, "
                     f"which holds {s['model']!r}; allowed: {s['model']!r}")
  info = data_lib.DATASETS[cfg.dataset]
  shape = list(cfg.input_shape or info.input_shape)
  if list(s["input_shape"]) != shape:
    raise ValueError(f"input_shape={shape} does not match the library {library_dir!r} "
                     f"({s['input_shape']}); allowed: {s['input_shape']}")
  available = library_lib.library_ratios(meta)
  for p in cfg.keep_choices:
    if library_lib.ratio_key(p) not in meta["entries"] or abs(
        float(meta["entries"][library_lib.ratio_key(p)]["keep"]) - p) > KEEP_MATCH_TOLERANCE:
      raise ValueError(f"keep_choices: keep ratio {p!r} is missing from the library "
                       f"{library_dir!r}; available: {list(available)}")
  for b in cfg.bit_choices:
    if b < MIN_WEIGHT_BITS:
      raise ValueError(f"bit_choices: bit-width {b} is outside the EMOMC range; allowed: "
                       f"integers {MIN_WEIGHT_BITS}..{quant.FLOAT_BITS} (EMOMC: 2..12)")
  if cfg.quantize_activations:
    raise ValueError("quantize_activations=True is invalid with a library; allowed: False "
                     "(EMOMC keeps activations in FP16, set fixed_act_bits)")
  if cfg.fixed_act_bits not in ACTIVATION_MODES:
    raise ValueError(f"fixed_act_bits={cfg.fixed_act_bits!r} is invalid with a library; "
                     f"allowed: 16 (FP16 activations, EMOMC) or 32 (float32)")


def _is_monotone_builtin(name: str) -> bool:
  """Built-in costs never decrease when a bit-width or the keep ratio grows."""
  return (name in costs_lib._BUILTIN_NAMES
          and costs_lib._REGISTRY.get(name) is costs_lib._BUILTIN_FNS.get(name))


def cheapest_config(cfg: SearchConfig, num_layers: int) -> QuantConfig:
  """The configuration with the smallest bits and keep of the search space ``[1]``."""
  return QuantConfig(w_bits=jnp.full((1, num_layers), min(cfg.bit_choices), jnp.int32),
                     a_bits=jnp.full((1, num_layers), cfg.fixed_act_bits, jnp.int32),
                     keep=jnp.asarray([min(cfg.keep_choices)], jnp.float32))


def check_cost_bounds(cfg: SearchConfig, workload) -> None:
  """Rejects cost bounds that no configuration of the search space can meet.

  Every built-in cost grows with every bit-width and the keep ratio, so the cheapest
  configuration (all weights at the smallest bit choice, the smallest keep) has the
  smallest value; if it exceeds a bound, nothing can meet it. Bounds on accuracy or
  on registered costs are checked during the search instead (after generation 0).

  Raises:
    ValueError naming the bound, the closest (cheapest) configuration and its value.
  """
  names = [n for n in cfg.constraints if n not in ACCURACY_OBJECTIVES and _is_monotone_builtin(n)]
  if not names:
    return
  cheapest = cheapest_config(cfg, workload.num_layers)
  values = np.asarray(costs_lib.make_objectives_fn(workload, tuple(names))(cheapest))[0]
  for name, value in zip(names, values):
    bound = cfg.constraints[name]
    if value > bound:
      raise ValueError(
          f"constraints[{name!r}]={bound!r} cannot be met by any configuration: the closest "
          f"one (all weights at {min(cfg.bit_choices)} bits, keep {min(cfg.keep_choices)}) has "
          f"{name}={float(value):.6g}; allowed: a bound >= {float(value):.6g}")


def build_library_problem(cfg: SearchConfig, library_dir: str | None = None,
                          progress: bool = True) -> LibraryProblem:
  """Builds the EMOMC stage-II problem of a search config and a library.

  Args:
    cfg: a validated SearchConfig (``keep_choices`` = library ratios to search,
      ``bit_choices`` = weight bit-widths, ``quantize_activations=False``,
      ``fixed_act_bits`` 16 (FP16) or 32).
    library_dir: the library directory (default: ``cfg.library``).
    progress: show a progress bar while the entries load.

  Returns:
    A :class:`LibraryProblem` (a ``search.problem.Problem``) for ``search.run.search``.

  Raises:
    ValueError: see :func:`check_library_config` and :func:`check_cost_bounds`.
  """
  library_dir = library_dir if library_dir is not None else getattr(cfg, "library", None)
  if not library_dir:
    raise ValueError("library: no library directory given; allowed: a directory written "
                     "by `nemo-jax prune-library`")
  meta = library_lib.read_library(library_dir)
  check_library_config(cfg, meta, library_dir)
  info = data_lib.DATASETS[cfg.dataset]
  shape = tuple(cfg.input_shape or info.input_shape)
  classes = cfg.num_classes or info.num_classes
  workload = workload_lib.extract_workload(cfg.model, shape, classes)
  check_cost_bounds(cfg, workload)

  graph = graph_lib.workload_graph(workload, edges=cfg.edges)
  num_nodes = 2 * workload.num_layers
  active = tuple(i for i, (kind, _) in enumerate(workload_lib.nodes_to_config_index(workload))
                 if kind == "w")
  space = SearchSpace(num_nodes=num_nodes, active_nodes=active,
                      num_choices=len(cfg.bit_choices), num_keep=len(cfg.keep_choices))

  model = models_lib.get_model(cfg.model, input_shape=shape, num_classes=classes)
  template = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, *shape), jnp.float32)))
  template = {"params": template["params"], "batch_stats": template.get("batch_stats", {})}
  # The dense model is stacked too: the report's quantization-only baseline (p = 1).
  ratios = tuple(float(p) for p in cfg.keep_choices)
  if not any(abs(p - library_lib.DENSE_KEEP) <= KEEP_MATCH_TOLERANCE for p in ratios):
    ratios = ratios + (library_lib.DENSE_KEEP,)
  entries = [library_lib.load_entry(library_dir, p, template, meta)
             for p in tqdm(ratios, disable=not progress, desc="load library", unit="model")]
  dense = entries[min(range(len(ratios)), key=lambda i: abs(ratios[i] - library_lib.DENSE_KEEP))]

  images, labels = data_lib.load_split(cfg.dataset, cfg.eval_split, source_dir=cfg.data_dir)
  eval_idx = data_lib.stratified_subset(labels, cfg.eval_per_class, seed=cfg.seed)
  x_eval = data_lib.preprocess(cfg.dataset, images[eval_idx])
  activations = ACTIVATION_MODES[cfg.fixed_act_bits]
  evaluator = LibraryEvaluator(model, entries, ratios, x_eval, labels[eval_idx],
                               activations=activations, allowed_bits=cfg.bit_choices,
                               batch_size=cfg.eval_batch_size, population_pad=population_pad(cfg),
                               strategy=cfg.eval_strategy)

  wanted = ("model_ratio", "bops_ratio") + tuple(cfg.objectives) + tuple(cfg.constraints)
  cost_names = tuple(n for n in dict.fromkeys(wanted) if n not in ACCURACY_OBJECTIVES)
  fp32 = jax.tree.map(lambda x: x[None], QuantConfig.uniform(workload.num_layers))
  fp32_values = np.asarray(costs_lib.make_objectives_fn(workload, cost_names)(fp32))[0]
  return LibraryProblem(
      cfg=cfg, model=model, variables=dense, workload=workload, graph=graph, space=space,
      evaluator=evaluator, calibration=None,
      bit_choices=jnp.asarray(cfg.bit_choices, jnp.int32),
      keep_choices=jnp.asarray(cfg.keep_choices, jnp.float32), cost_names=cost_names,
      fp32_costs={n: float(v) for n, v in zip(cost_names, fp32_values)},
      library_dir=library_dir, library_meta=meta, entry_ratios=ratios, entries=entries,
      activations=activations, dense_variables=dense)
