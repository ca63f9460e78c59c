"""``search()``: the researcher-facing entry point (also behind ``nemo-jax search``).

Runs the engine generation by generation with a progress bar, checkpoints the whole
search state with orbax after every generation (a killed run resumes with
``resume=True`` and ends with the same ``front.json`` as an uninterrupted one), and
writes the results through :class:`~nemo_jax._src.run.rundir.RunDir`: ``config.json``
(resolved config, package versions, seed, timing, hypervolumes), ``front.json``,
``history.csv``, ``uniform.json``, ``front.png`` and ``species.png``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from nemo_jax._src import checkpoint as ckpt
from nemo_jax._src import faults
from nemo_jax._src.costs.registry import make_objectives_fn
from nemo_jax._src.graph import policy_graph
from nemo_jax._src.problem import (ACCURACY_OBJECTIVES, IN_MEMORY_DATASET, USER_MODEL, Problem,
                                   compose_problem, data_splits, is_user_model)
from nemo_jax._src.registries import Registries
from nemo_jax._src.run import checkpoint as ckpt_lib
from nemo_jax._src.run import final as final_lib
from nemo_jax._src.run import report
from nemo_jax._src.run import sensitivity as sens_lib
from nemo_jax._src.run.config import SearchConfig, load_search_config, search_registries
from nemo_jax._src.run.rundir import FRONT_FILE, UNIFORM_FILE, RunDir
from nemo_jax._src.search import guide as guide_lib
from nemo_jax._src.search.config import species_labels
from nemo_jax._src.search.engine import Engine
from nemo_jax._src.search.guide import SearchGuide

MAX_TO_KEEP = 2

RESUME_OVERRIDES = ("generations", "final_split", "final_max_images", "selection_per_class")
"""Fields a resumed run may change: they decide how long it runs and what is reported
after the loop, never the shape or content of the saved state."""


@dataclasses.dataclass
class SearchResult:
  """What a search returns.

  Attributes:
    front: list of front members (dicts as in ``front.json``: ``w_bits``, ``a_bits``,
      ``keep``, ``species``, ``generation``, ``objectives`` and all ``metrics``).
    archive: the raw archive arrays (every non-dominated configuration seen).
    history: one dict per generation (as in ``history.csv``).
    config: the resolved SearchConfig.
    out_dir: where the files were written (None if not written).
    uniform: the uniform-precision baselines (W = A for each bit choice).
    hypervolume: the final front's hypervolume per image set (``final.front_hypervolumes``):
      ``fitness`` (in sample) and, when measured, ``selection`` and ``test``.
    quality: the drop-bounded hypervolume, iso-accuracy and iso-cost tables
      (``quality.quality_report``; empty without a ``top1_error`` objective).
    timing: wall / compile seconds per phase (``config.json``'s ``timing``).
    sensitivity: the per-quantizer sensitivity table written into the run directory
      (``run/sensitivity.py``), or None (no run directory, or ``run.sensitivity=False``).
  """
  front: list[dict]
  archive: dict
  history: list[dict]
  config: SearchConfig
  out_dir: str | None
  uniform: list[dict]
  hypervolume: dict[str, float] = dataclasses.field(default_factory=dict)
  quality: dict = dataclasses.field(default_factory=dict)
  timing: dict = dataclasses.field(default_factory=dict)
  sensitivity: dict | None = None


def package_versions() -> dict:
  out = {}
  for p in ("nemo-jax", "jax", "jaxlib", "flax", "optax", "evosax", "jraph", "orbax-checkpoint",
            "numpy"):
    try:
      out[p] = importlib.metadata.version(p)
    except importlib.metadata.PackageNotFoundError:
      out[p] = None
  return out


def build_problem(config: Any = None, registries: Registries | None = None,
                  progress: bool = True, model=None, variables=None, data=None) -> Problem:
  """The problem of a search config (its problem section with the run's image seed,
  population and selection images; ``problem.compose_problem``).

  Args:
    config: anything :func:`load_search_config` takes (a SearchConfig, a file, a
      mapping, None for the default).
    registries: models, costs, schemes beyond the built-ins (the config's plugins are
      added).
    progress: show progress bars (library loading).
    model, variables: a user's linen model and its float variables, or an NNX module
      (variables optional) (``model="custom"``).
    data: in-memory splits (``dataset="arrays"``), ``problem.data_splits``.
  """
  cfg = config if isinstance(config, SearchConfig) else load_search_config(config, registries)
  registries = search_registries(cfg, registries)
  return compose_problem(cfg.problem, seed=cfg.image_seed, population=cfg.search.population,
                         selection_per_class=cfg.run.selection_per_class,
                         costs=registries.costs, models=registries.models,
                         schemes=registries.schemes, progress=progress, model=model,
                         variables=variables, data=data)


def sensitivity(config: Any = None, out_dir: str | None = None, base_bits: int = 8,
                registries: Registries | None = None, progress: bool = True,
                problem: Problem | None = None) -> dict:
  """The per-quantizer sensitivity of a search config's problem (``run/sensitivity.py``).

  Every searched quantizer alone at every bit choice below ``base_bits``, the rest at
  ``base_bits``, scored on the fitness images; cached by fingerprint.

  Args:
    config: anything :func:`load_search_config` takes (None: the embedded default).
    out_dir: also write ``sensitivity.json`` and the heat map ``sensitivity.png`` there.
    base_bits: the other quantizers' bit-width (32: float).
    registries: models, costs, schemes beyond the built-ins.
    progress: progress bars.
    problem: the config's problem if already built.

  Returns:
    The table (``run.sensitivity.compute``).
  """
  cfg = config if isinstance(config, SearchConfig) else load_search_config(config, registries)
  if problem is None:
    problem = build_problem(cfg, registries, progress=progress)
  table = sens_lib.load_or_compute(problem, base_bits=base_bits, progress=progress)
  if out_dir is not None:
    faults.probe_writable(out_dir, what="out_dir")
    sens_lib.write(out_dir, table)
  return table


def make_guide(problem: Problem, table: Mapping) -> SearchGuide:
  """The sensitivity guide of a problem (``search/guide.py``): the drop of every searched
  node at every bit choice, and the greedy frontier under the sum of the problem's
  normalised cost objectives (``model_ratio`` and ``bops_ratio`` when none is searched)."""
  cfg, space = problem.cfg, problem.space
  drop = guide_lib.drop_matrix(table, cfg.bit_choices, space.active_nodes)
  names = [n for n in cfg.objectives if n not in ACCURACY_OBJECTIVES] or list(cfg.cost_names[:2])
  scale = jnp.asarray([problem.fp32_costs[n] for n in names], jnp.float32)
  cost_fn = make_objectives_fn(problem.workload, tuple(names), problem.costs_registry)
  keep = len(cfg.keep_choices) - 1
  n_rows = len(space.active_nodes)

  @jax.jit
  def total(choice):
    configs = problem.decode(choice, jnp.full(choice.shape[:1], keep, jnp.int32))
    return jnp.sum(cost_fn(configs) / scale, axis=-1)

  def cost(choice):   # padded to one shape: one compile for the whole frontier
    choice = np.asarray(choice, np.int32)
    padded = np.concatenate([choice, np.repeat(choice[:1], n_rows - len(choice), 0)])
    return np.asarray(total(jnp.asarray(padded)))[:len(choice)]

  frontier, costs = guide_lib.greedy_frontier(drop, cost)
  return SearchGuide(drop=drop, frontier=frontier, frontier_cost=costs)


def make_engine(cfg: SearchConfig, problem: Problem, registries: Registries | None = None,
                guide: SearchGuide | None = None) -> Engine:
  """The engine of a config on its problem (the GNN species' graph built here, with the
  sensitivity columns when ``sensitivity_features``)."""
  graph = policy_graph(problem.workload, cfg.search.edges, cfg.search.node_features)
  if cfg.search.sensitivity_features:
    if guide is None:
      raise ValueError("sensitivity_features: no sensitivity guide was computed; allowed: "
                       "make_engine(cfg, problem, guide=make_guide(problem, table))")
    extra = guide_lib.node_features(guide.drop, problem.space.active_nodes,
                                    problem.space.num_nodes)
    graph = graph._replace(nodes=np.concatenate([graph.nodes, extra], axis=1))
  return Engine(cfg.search, problem.space, graph, int(graph.nodes.shape[-1]),
                problem.raw_names, search_registries(cfg, registries).species,
                num_objectives=len(cfg.problem.objectives), hv_ref=cfg.run.hv_ref,
                guide=guide)


def check_feasibility(problem: Problem, cfg: SearchConfig, archive, labels) -> str | None:
  """After generation 0: if no configuration meets the constraints, say so.

  Names every bound and the closest configuration found (least total violation). With
  ``infeasible="error"`` this raises ValueError, otherwise it warns (and prints the
  message) and the search goes on.

  Returns:
    The message, or None when a feasible configuration exists (or nothing is bounded).
  """
  constraints = cfg.problem.constraints
  if not constraints:
    return None
  a = jax.tree.map(np.asarray, archive)
  valid = a.valid
  if not valid.any() or (valid & (a.violation <= 0)).any():
    return None
  i = int(np.argmin(np.where(valid, a.violation, np.inf)))
  m = final_lib.members(problem, a.choice[i:i + 1], a.keep_idx[i:i + 1], a.species[i:i + 1],
                        a.generation[i:i + 1], a.raw[i:i + 1], labels)[0]
  bounds = ", ".join(f"{n} <= {b!r} (closest has {m['metrics'][n]:.6g})"
                     for n, b in constraints.items())
  msg = (f"constraints: no configuration of generation 0 meets {bounds}; closest "
         f"configuration: keep={m['keep']:.4g}, w_bits={m['w_bits']}, a_bits={m['a_bits']}")
  if cfg.search.infeasible == "error":
    raise ValueError(msg + " (infeasible='error'; set infeasible='warn' to go on)")
  warnings.warn(msg, stacklevel=2)
  return msg


def _history_row(generation, state, metrics, hv, labels, seconds, acc_seconds,
                 compile_s=0.0, compiles=0, cache_hits=0, unique=0):
  row = {"generation": generation, "evaluations": int(np.sum(np.asarray(state.evals))),
         "unique_evaluations": int(unique),
         "hypervolume": float(hv), "archive_size": int(np.sum(np.asarray(state.archive.valid)))}
  for i, l in enumerate(labels):
    row[f"size:{l}"] = int(np.asarray(state.sizes)[i])
  for i, l in enumerate(labels):
    row[f"utility:{l}"] = float(np.asarray(metrics.utility)[i]) if metrics else float("nan")
  for i, l in enumerate(labels):
    row[f"front:{l}"] = int(np.asarray(metrics.front_counts)[i]) if metrics else 0
  row["seconds"] = round(seconds, 4)
  row["accuracy_seconds"] = round(acc_seconds, 4)
  row["compile_seconds"] = round(compile_s, 4)
  row["compiles"] = int(compiles)
  row["cache_hits"] = int(cache_hits)
  return row


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_compile_totals = {"seconds": 0.0, "compiles": 0}
_listening = [False]


def compile_stats() -> dict:
  """``{"seconds", "compiles"}`` this process spent / made so far (jax.monitoring).

  ``seconds`` sums tracing, lowering and XLA compilation; ``compiles`` counts XLA
  compilations (a persistent-cache hit skips the backend compile: a warm second run
  reports only tracing and lowering, and no compiles). The listener is registered on
  the first call.
  """
  if not _listening[0]:
    def listener(event, duration, **_):
      if event in _COMPILE_EVENTS:
        _compile_totals["seconds"] += duration
      if event == _BACKEND_COMPILE:
        _compile_totals["compiles"] += 1
    jax.monitoring.register_event_duration_secs_listener(listener)
    _listening[0] = True
  return dict(_compile_totals)


def compile_seconds() -> float:
  """Seconds this process spent tracing, lowering and compiling (:func:`compile_stats`)."""
  return compile_stats()["seconds"]


class _Phase:
  """Wall seconds, compile seconds and XLA compiles of one phase of a run."""

  def __init__(self):
    self.t0, self.c0 = time.perf_counter(), compile_stats()

  def done(self) -> dict:
    c = compile_stats()
    return {"seconds": round(time.perf_counter() - self.t0, 4),
            "compile_seconds": round(c["seconds"] - self.c0["seconds"], 4),
            "compiles": c["compiles"] - self.c0["compiles"]}


def _canonical(tree):
  """Host copy with strong dtypes (so the first and a resumed call compile the same)."""
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)


def _score(problem: Problem, batch):
  """Decodes and scores a batch; returns device arrays and the accuracy seconds."""
  configs = problem.decode(batch.choice, batch.keep_idx)
  F, violation, raw, acc_seconds = problem.objectives(configs, timed=True)
  return (jnp.asarray(F), jnp.asarray(violation),
          jnp.asarray(final_lib.raw_matrix(raw, problem.raw_names)), acc_seconds)


def _resolve_config(config, out_dir, resume, registries, overrides, splits,
                    pair: bool) -> SearchConfig:
  """The run's config: loaded (or the saved one on resume) with the in-memory data's
  fields set (``pair``: the data was one ``(images, labels)`` pair, no test split)."""
  if resume:
    cfg = _resumed_config(out_dir, config, registries, overrides)
  else:
    cfg = load_search_config(config, registries, **overrides)
  if splits is not None and cfg.problem.num_classes is None:
    cfg = cfg.replace(num_classes=int(max(int(y.max()) for _, y in splits.values()) + 1))
  final_split = cfg.run.final_split
  if splits is not None and final_split is not None and final_split not in splits:
    if not pair:
      raise ValueError(f"final_split={final_split!r} is not in data (splits "
                       f"{sorted(splits)}); allowed: one of {sorted(splits)} or None")
    cfg = cfg.replace(final_split=None)
  classes = cfg.problem.num_classes
  if splits is not None and classes is not None:
    for split, (_, y) in splits.items():
      if int(y.max()) >= classes:
        raise ValueError(f"data[{split!r}]: label {int(y.max())} at index "
                         f"{int(np.argmax(y))} with num_classes={classes}; allowed: labels "
                         f"in 0..{classes - 1} (or num_classes > {int(y.max())})")
  if splits is None and not is_user_model(cfg.problem.model) and cfg.problem.library is None:
    # The test re-evaluation must not be on the images the checkpoint was trained on.
    ckpt.check_held_out(cfg.problem.checkpoint, cfg.problem.dataset, cfg.run.final_split,
                        "final_split", cfg.problem.model)
  return cfg


def _check_problem(problem: Problem, cfg: SearchConfig) -> None:
  """A prebuilt problem must be the config's: one source of truth (its population only
  pads the evaluator, so it may differ)."""
  for name, have, want in (("problem", problem.cfg, cfg.problem),
                           ("data_seed", problem.seed, cfg.image_seed)):
    if have != want:
      diff = name
      if name == "problem":
        diff = next(f.name for f in dataclasses.fields(want)
                    if getattr(have, f.name) != getattr(want, f.name))
      raise ValueError(f"problem: built for {diff}={_field(have, diff)!r}, the config has "
                       f"{diff}={_field(want, diff)!r}; allowed: the problem of this config "
                       "(nemo_jax.build_problem(config)) or no problem")


def _field(value, name):
  return getattr(value, name) if dataclasses.is_dataclass(value) else value


def search(config: Any = None, out_dir: str | None = None, resume: bool = False,
           progress: bool = True, problem: Problem | None = None,
           registries: Registries | None = None,
           callback: Callable[[dict], Any] | None = None, overwrite: bool = False,
           model=None, variables=None, data=None, **overrides) -> SearchResult:
  """Runs a NEMO (or baseline) search. All objectives are minimised.

  Args:
    config: a SearchConfig, a mapping, a ``.py`` (``get_config()``) / ``.json`` file, or
      None for the embedded default (resnet20 on the shipped Fashion-MNIST, 4 species).
    out_dir: where to write results and checkpoints (None: nothing is written and no
      checkpoint is kept).
    resume: continue the run in ``out_dir`` from its last checkpoint (its config.json
      is used; ``generations`` may be overridden to extend it).
    progress: show a progress bar.
    problem: a prebuilt Problem (``build_problem(config)``, e.g. to reuse its images and
      calibration across search seeds with ``data_seed`` set); it must be the config's
      (same problem section and image seed: checked).
    registries: user models, costs, schemes and species the config names
      (``nemo_jax.Registries``); plugins named in the config itself (``custom_costs`` /
      ``custom_species``) are imported too, also on resume.
    callback: called with each generation's history row.
    overwrite: replace a previous run in ``out_dir`` (without it, a directory that
      already holds a run is an error: pass ``resume=True`` or another directory). A
      directory holding an EMOMC library is never used. ``out_dir`` is locked for the
      whole search (``RunDir.lock``): a second search / resume / fine-tuning there is
      refused, naming this one; a new directory that the search fails to write into is
      removed again.
    model, variables: your own linen model and its float variables (every
      ``nn.Conv`` / ``nn.ConvTranspose`` / ``nn.Dense`` / ``nn.DenseGeneral`` call is
      quantized by interception; ``docs/DESIGN.md``, "Your own model"), or an NNX
      module (``nnx.Conv`` / ``nnx.ConvTranspose`` / ``nnx.Linear`` /
      ``nnx.LinearGeneral``; ``variables`` optional: None uses its own state, an
      ``nnx.State`` or a variables view replaces it); the config's ``model`` becomes
      ``"custom"``. Pass them again on resume.
    data: in-memory data instead of a named dataset (used as given, preprocessed):
      ``(images [N, H, W, C], labels [N])``, the split ``"train"`` (fitness,
      calibration and selection images; the test re-evaluation is then skipped,
      ``final_split=None``), or
      ``{"train": (x, y), "test": (x, y)}`` (the front is re-evaluated on ``"test"``).
      The config's ``dataset`` becomes ``"arrays"``, ``input_shape`` the images' and
      ``num_classes`` (if unset) ``max(label) + 1``. Pass it again on resume.
    **overrides: config fields to replace (``generations=5``, ``seed=1``, ...).

  Returns:
    A SearchResult with the front, the archive and the history.

  Raises:
    ValueError: a bad config (naming the field), an unwritable ``out_dir``, a resume
      whose overrides contradict the saved run, a problem that is not the config's, a
      run directory with no checkpoint that restores, non-finite ``data`` (naming the
      split and image), a checkpoint whose metadata contradicts the config, or an
      ``out_dir`` another process writes (``faults.LockedError``; ``docs/DESIGN.md``,
      "Faults").
    nemo_jax._src.faults.StopRequested: SIGINT / SIGTERM arrived; the last generation's
      checkpoint is complete, ``front.json`` / ``history.csv`` hold the results so far.
    nemo_jax._src.faults.CheckpointWriteError: a checkpoint write failed (disk full);
      the previous checkpoint is intact.
  """
  started = time.perf_counter()
  if model is not None or variables is not None:
    overrides["model"] = USER_MODEL
  splits = None
  if data is not None:
    splits = data_splits(data)
    overrides["dataset"] = IN_MEMORY_DATASET
    overrides["input_shape"] = tuple(next(iter(splits.values()))[0].shape[1:])
  cfg = _resolve_config(config, out_dir, resume, registries, overrides, splits,
                        isinstance(data, (tuple, list)))
  if out_dir is None:
    return _run(cfg, None, resume, problem, registries, progress, callback, model,
                variables, splits, started)
  run = RunDir(out_dir)
  # One writer per directory: a second search / resume / fine-tuning there is refused.
  with run.lock("nemo-jax search" + (" --resume" if resume else ""), create=not resume):
    if not resume:
      run.claim(overwrite)
    # Before any work: an unwritable directory or a full disk is an error now, not after
    # the calibration and generation 0.
    faults.probe_writable(out_dir, what="out_dir")
    return _run(cfg, run, resume, problem, registries, progress, callback, model,
                variables, splits, started)


def _run(cfg: SearchConfig, run: RunDir | None, resume: bool, problem, registries,
         progress, callback, model, variables, splits, started: float) -> SearchResult:
  """The search of a resolved config (its directory locked and probed); ``started``:
  the wall clock when :func:`search` was called (the run's ``total_seconds``)."""
  phase = _Phase()
  if problem is None:
    problem = build_problem(cfg, registries, progress=progress, model=model,
                            variables=variables, data=splits)
  else:
    _check_problem(problem, cfg)
  setup = phase.done()
  timing = {"setup_seconds": setup["seconds"], "setup_compile_seconds": setup["compile_seconds"],
            "setup_compiles": setup["compiles"]}
  sensitivity = guide = None
  wanted = run is not None and cfg.run.sensitivity and problem.needs_accuracy
  if wanted or cfg.search.needs_guide:
    phase = _Phase()
    sensitivity = sens_lib.load_or_compute(problem, progress=progress)
    if run is not None:
      sens_lib.write(run.path, sensitivity)
    if cfg.search.needs_guide:
      guide = make_guide(problem, sensitivity)
    timing["sensitivity_seconds"] = phase.done()["seconds"]
  engine = make_engine(cfg, problem, registries, guide)
  manager = _open_run(run, cfg, engine, resume)
  state, history, seen = None, [], Seen()
  if resume and manager is not None and manager.all_steps():
    state, history, seen = _restore(manager, run, engine, cfg)
  state, history = _loop(cfg, problem, engine, manager, run, state, history, seen,
                         progress, callback)
  result = _finish(cfg, problem, run, state, history, timing, progress)
  result.sensitivity = sensitivity
  timing["total_seconds"] = round(time.perf_counter() - started, 4)
  if run is not None:
    run.record(timing=timing)
  return result


def _open_run(run: RunDir | None, cfg: SearchConfig, engine: Engine, resume: bool):
  """Probes room for the checkpoints, writes config.json (a new run) and opens the
  checkpoint manager (None without a run directory)."""
  if run is None:
    return None
  template, _ = jax.eval_shape(engine.init_state, jax.random.key(cfg.search.seed))
  faults.probe_writable(run.path, _checkpoint_bytes(template) * (MAX_TO_KEEP + 1), "out_dir")
  if not resume:
    run.write_config(cfg, seed=cfg.search.seed, versions=package_versions())
  return ckpt_lib.checkpoint_manager(run.checkpoints, MAX_TO_KEEP)


class Seen:
  """The distinct configurations a run has proposed (its budget counts them), saved with
  every checkpoint so that a resumed run counts exactly as an uninterrupted one."""

  def __init__(self, keys=()):
    self.keys = set(keys)

  def add(self, batch) -> int:
    """Adds a batch's configurations; returns the distinct count so far."""
    rows = np.concatenate([np.asarray(batch.choice, np.int16),
                           np.asarray(batch.keep_idx, np.int16)[:, None]], axis=1)
    self.keys.update(r.tobytes().hex() for r in rows)
    return len(self.keys)

  def __len__(self) -> int:
    return len(self.keys)


def _loop(cfg: SearchConfig, problem: Problem, engine: Engine, manager, run, state, history,
          seen: Seen, progress: bool, callback):
  """Generation 0 (unless resumed) and every generation up to ``generations`` (or until
  ``budget`` distinct configurations were evaluated), each checkpointed; a stop signal
  ends the loop after a generation's checkpoint."""
  labels = species_labels(cfg.search.species)
  hv_fn = jax.jit(engine.hypervolume)
  generations, budget = cfg.search.generations, cfg.search.budget
  hint = (f"resume with: nemo-jax search --resume {run.path}" if run is not None
          else "nothing was saved (out_dir=None)")
  bar = tqdm(total=generations + 1, disable=not progress, desc="search", unit="gen")
  with faults.GracefulStop(hint) as stop:
    if state is None:
      phase, hits = _Phase(), problem.cache.hits
      state, batch = engine.init_state(jax.random.key(cfg.search.seed))
      # propose / select compile beside generation 0's evaluation: generation 1 onward
      # compiles nothing.
      with ThreadPoolExecutor(max_workers=1) as pool:
        compiled = pool.submit(engine.precompile)
        F, viol, raw, acc_s = _score(problem, batch)
        compiled.result()
      state = _canonical(engine.finish_init(state, batch, F, viol, raw))
      hv, t = hv_fn(state.archive), phase.done()
      history.append(_history_row(0, state, None, hv, labels, t["seconds"], acc_s,
                                  t["compile_seconds"], t["compiles"], problem.cache.hits - hits,
                                  seen.add(batch)))
      _save(manager, state, history, seen)
      check_feasibility(problem, cfg, state.archive, labels)
    else:
      engine.precompile()
      bar.update(int(state.generation))
    bar.update(1)
    _postfix(bar, history[-1], labels)
    while True:
      if stop.requested:
        bar.close()
        _write_partial(run, problem, state, history, labels)
        stop.check()
      if int(state.generation) >= generations or (budget is not None and len(seen) >= budget):
        break
      phase, hits = _Phase(), problem.cache.hits
      proposal, batch = engine.propose(state)
      F, viol, raw, acc_s = _score(problem, batch)
      state, metrics = engine.select(state, proposal, batch, F, viol, raw)
      hv, t = hv_fn(state.archive), phase.done()
      row = _history_row(int(state.generation), state, metrics, hv, labels, t["seconds"],
                         acc_s, t["compile_seconds"], t["compiles"], problem.cache.hits - hits,
                         seen.add(batch))
      history.append(row)
      _save(manager, state, history, seen)
      if callback is not None:
        callback(row)
      bar.update(1)
      _postfix(bar, row, labels)
  bar.close()
  return state, history


def _finish(cfg: SearchConfig, problem: Problem, run: RunDir | None, state, history,
            timing: dict, progress: bool) -> SearchResult:
  """The final phase, the quality metrics, the result files and the result."""
  labels = species_labels(cfg.search.species)
  phase = _Phase()
  front = final_lib.front_members(problem, state.archive, labels)
  uniform, references, size = final_lib.final_phase(problem, cfg, front, progress)
  final = phase.done()
  timing.update(search_seconds=round(sum(r["seconds"] for r in history), 4),
                search_compile_seconds=round(sum(r.get("compile_seconds", 0.0)
                                                 for r in history), 4),
                search_compiles=int(sum(r.get("compiles", 0) for r in history)),
                accuracy_seconds=round(sum(r.get("accuracy_seconds", 0.0)
                                           for r in history), 4),
                cache_hits=int(sum(r.get("cache_hits", 0) for r in history)),
                final_seconds=final["seconds"], final_compile_seconds=final["compile_seconds"],
                final_compiles=final["compiles"], final_population=size)
  hypervolume = final_lib.front_hypervolumes(front, cfg)
  quality = final_lib.front_quality(cfg, front, uniform, references)
  if run is not None:
    phase = _Phase()
    write_outputs(run, cfg, front, uniform, history, labels)
    timing["output_seconds"] = phase.done()["seconds"]
    run.record(timing=timing, final_hypervolume=hypervolume, quality=quality,
               references=references)
  return SearchResult(front=front, archive=jax.tree.map(np.asarray, state.archive.to_dict()),
                      history=history, config=cfg, out_dir=None if run is None else run.path,
                      uniform=uniform, hypervolume=hypervolume, quality=quality,
                      timing=timing)


def write_outputs(run: RunDir, cfg: SearchConfig, front, uniform, history, labels):
  run.write_members(FRONT_FILE, front)
  run.write_members(UNIFORM_FILE, uniform)
  run.write_history(history)
  if front:
    report.plot_front(run.path, front, cfg.problem.objectives, uniform)
  report.plot_species(run.path, history, labels)


def _checkpoint_bytes(template) -> int:
  """Bytes one checkpoint of the search state takes (array data; metadata extra)."""
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(template)
                 if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype,
                                                                      jax.dtypes.prng_key)))


def _resumed_config(out_dir, config, registries, overrides) -> SearchConfig:
  """The saved run's config; an override may only change ``RESUME_OVERRIDES``."""
  if out_dir is None:
    raise ValueError("resume: out_dir is required (the run directory to continue)")
  run = RunDir(out_dir)
  if not os.path.exists(run.file("config.json")):
    raise ValueError(f"resume: {out_dir!r} holds no previous run (config.json missing)")
  saved = run.saved_config()
  saved_cfg = load_search_config(saved, registries)
  asked = {k: x for k, x in overrides.items() if x is not None}
  if config is not None:
    given = load_search_config(config, registries, **asked).flat_dict()
    asked = {k: x for k, x in given.items() if x != saved_cfg.flat_dict()[k]} | asked
  cfg = load_search_config(saved, registries, **asked)
  ckpt_lib.check_resume_settings(cfg.flat_dict(), saved_cfg.flat_dict(), RESUME_OVERRIDES,
                                 out_dir, "start a new run in another directory to change it")
  return cfg


def _restore(manager, run: RunDir, engine: Engine, cfg: SearchConfig):
  """The newest checkpoint that restores completely; damaged newer steps are set aside."""
  template, _ = jax.eval_shape(engine.init_state, jax.random.key(cfg.search.seed))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
  expected = jax.tree.structure(abstract)

  def restore(step):
    items = dict(state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore())
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          **items, seen=ocp.args.JsonRestore()))
    except Exception:  # noqa: BLE001 - a step saved before "seen" existed: count anew
      restored = dict(manager.restore(step, args=ocp.args.Composite(**items)), seen=[])
    state, history = restored["state"], list(restored["history"])
    if jax.tree.structure(state) != expected or len(history) != int(state.generation) + 1:
      raise ValueError(f"step {step} does not hold this run's state")
    return _canonical(state), history, Seen(restored["seen"])

  step, (state, history, seen), problems = ckpt_lib.restore_newest_good(
      manager.all_steps(), restore, run.checkpoints)
  damaged = ckpt_lib.set_aside(manager, step, run.damaged)
  if damaged:
    tqdm.write(f"resume: checkpoint step(s) {damaged} in {run.checkpoints} could not be "
               f"restored ({'; '.join(problems)}); resumed from step {step}, moved the "
               f"damaged step(s) to {run.damaged}", file=sys.stderr)
  return state, history, seen


def _save(manager, state, history, seen: Seen):
  """Writes generation ``state.generation``; on failure the previous step stays intact."""
  if manager is None:
    return
  ckpt_lib.save_step(manager, int(state.generation), ocp.args.Composite(
      state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history),
      seen=ocp.args.JsonSave(sorted(seen.keys))))


def _write_partial(run: RunDir | None, problem, state, history, labels) -> None:
  """On a stop: the front and history so far, readable (no final-phase accuracy)."""
  if run is None:
    return
  run.write_members(FRONT_FILE, final_lib.front_members(problem, state.archive, labels))
  run.write_history(history)


def _postfix(bar, row: Mapping, labels):
  bar.set_postfix_str(f"evals={row['unique_evaluations']}/{row['evaluations']} "
                      f"hv={row['hypervolume']:.4f} sizes="
                      + "/".join(str(row[f'size:{l}']) for l in labels))
