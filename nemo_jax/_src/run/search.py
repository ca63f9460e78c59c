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
import time
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from nemo_jax._src import checkpoint as ckpt
from nemo_jax._src import faults
from nemo_jax._src.graph import policy_graph
from nemo_jax._src.problem import (IN_MEMORY_DATASET, USER_MODEL, Problem, compose_problem,
                                   data_splits, is_user_model)
from nemo_jax._src.registries import Registries
from nemo_jax._src.run import checkpoint as ckpt_lib
from nemo_jax._src.run import final as final_lib
from nemo_jax._src.run import report
from nemo_jax._src.run.config import SearchConfig, load_search_config, search_registries
from nemo_jax._src.run.rundir import FRONT_FILE, UNIFORM_FILE, RunDir
from nemo_jax._src.search.config import species_labels
from nemo_jax._src.search.engine import Engine

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
  """
  front: list[dict]
  archive: dict
  history: list[dict]
  config: SearchConfig
  out_dir: str | None
  uniform: list[dict]
  hypervolume: dict[str, float] = dataclasses.field(default_factory=dict)


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
    model, variables: a user's linen model and its float variables (``model="custom"``).
    data: in-memory splits (``dataset="arrays"``), ``problem.data_splits``.
  """
  cfg = config if isinstance(config, SearchConfig) else load_search_config(config, registries)
  registries = search_registries(cfg, registries)
  return compose_problem(cfg.problem, seed=cfg.image_seed, population=cfg.search.population,
                         selection_per_class=cfg.run.selection_per_class,
                         costs=registries.costs, models=registries.models,
                         schemes=registries.schemes, progress=progress, model=model,
                         variables=variables, data=data)


def make_engine(cfg: SearchConfig, problem: Problem,
                registries: Registries | None = None) -> Engine:
  """The engine of a config on its problem (the GNN species' graph built here)."""
  graph = policy_graph(problem.workload, cfg.search.edges, cfg.search.node_features)
  return Engine(cfg.search, problem.space, graph, int(graph.nodes.shape[-1]),
                problem.raw_names, search_registries(cfg, registries).species,
                num_objectives=len(cfg.problem.objectives), hv_ref=cfg.run.hv_ref)


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
  tqdm.write("warning: " + msg)
  return msg


def _history_row(generation, state, metrics, hv, labels, seconds, acc_seconds,
                 compile_s=0.0):
  row = {"generation": generation, "evaluations": int(np.sum(np.asarray(state.evals))),
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
  return row


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_total = [0.0]
_listening = [False]


def compile_seconds() -> float:
  """Seconds this process spent tracing, lowering and compiling (jax.monitoring).

  A persistent-cache hit skips the backend compile, so a warm second run reports only
  tracing and lowering. The listener is registered on the first call.
  """
  if not _listening[0]:
    def listener(event, duration, **_):
      if event in _COMPILE_EVENTS:
        _compile_total[0] += duration
    jax.monitoring.register_event_duration_secs_listener(listener)
    _listening[0] = True
  return _compile_total[0]


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
                        "final_split")
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
      quantized by interception; ``docs/DESIGN.md``, "Your own model"); the config's
      ``model`` becomes ``"custom"``. Pass them again on resume.
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
                variables, splits)
  run = RunDir(out_dir)
  # One writer per directory: a second search / resume / fine-tuning there is refused.
  with run.lock("nemo-jax search" + (" --resume" if resume else ""), create=not resume):
    if not resume:
      run.claim(overwrite)
    # Before any work: an unwritable directory or a full disk is an error now, not after
    # the calibration and generation 0.
    faults.probe_writable(out_dir, what="out_dir")
    return _run(cfg, run, resume, problem, registries, progress, callback, model,
                variables, splits)


def _run(cfg: SearchConfig, run: RunDir | None, resume: bool, problem, registries,
         progress, callback, model, variables, splits) -> SearchResult:
  """The search of a resolved config (its directory locked and probed)."""
  if problem is None:
    problem = build_problem(cfg, registries, progress=progress, model=model,
                            variables=variables, data=splits)
  else:
    _check_problem(problem, cfg)
  engine = make_engine(cfg, problem, registries)
  manager = _open_run(run, cfg, engine, resume)
  state, history = None, []
  if resume and manager is not None and manager.all_steps():
    state, history = _restore(manager, run, engine, cfg)
  state, history = _loop(cfg, problem, engine, manager, run, state, history, progress,
                         callback)
  return _finish(cfg, problem, run, state, history)


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


def _loop(cfg: SearchConfig, problem: Problem, engine: Engine, manager, run, state, history,
          progress: bool, callback):
  """Generation 0 (unless resumed) and every generation up to ``generations``, each
  checkpointed; a stop signal ends the loop after a generation's checkpoint."""
  labels = species_labels(cfg.search.species)
  hv_fn = jax.jit(engine.hypervolume)
  generations = cfg.search.generations
  hint = (f"resume with: nemo-jax search --resume {run.path}" if run is not None
          else "nothing was saved (out_dir=None)")
  bar = tqdm(total=generations + 1, disable=not progress, desc="search", unit="gen")
  with faults.GracefulStop(hint) as stop:
    if state is None:
      t0, c0 = time.perf_counter(), compile_seconds()
      state, batch = engine.init_state(jax.random.key(cfg.search.seed))
      F, viol, raw, acc_s = _score(problem, batch)
      state = _canonical(engine.finish_init(state, batch, F, viol, raw))
      history.append(_history_row(0, state, None, hv_fn(state.archive), labels,
                                  time.perf_counter() - t0, acc_s, compile_seconds() - c0))
      _save(manager, state, history)
      check_feasibility(problem, cfg, state.archive, labels)
    else:
      bar.update(int(state.generation))
    bar.update(1)
    _postfix(bar, history[-1], labels)
    while True:
      if stop.requested:
        bar.close()
        _write_partial(run, problem, state, history, labels)
        stop.check()
      if int(state.generation) >= generations:
        break
      t0, c0 = time.perf_counter(), compile_seconds()
      proposal, batch = engine.propose(state)
      F, viol, raw, acc_s = _score(problem, batch)
      state, metrics = engine.select(state, proposal, batch, F, viol, raw)
      row = _history_row(int(state.generation), state, metrics, hv_fn(state.archive), labels,
                         time.perf_counter() - t0, acc_s, compile_seconds() - c0)
      history.append(row)
      _save(manager, state, history)
      if callback is not None:
        callback(row)
      bar.update(1)
      _postfix(bar, row, labels)
  bar.close()
  return state, history


def _finish(cfg: SearchConfig, problem: Problem, run: RunDir | None, state, history
            ) -> SearchResult:
  """The final phase, the result files and the result."""
  labels = species_labels(cfg.search.species)
  t0, c0 = time.perf_counter(), compile_seconds()
  front = final_lib.front_members(problem, state.archive, labels)
  uniform, size = final_lib.final_phase(problem, cfg, front)
  timing = {"search_seconds": round(sum(r["seconds"] for r in history), 4),
            "search_compile_seconds": round(sum(r.get("compile_seconds", 0.0)
                                                for r in history), 4),
            "final_seconds": round(time.perf_counter() - t0, 4),
            "final_compile_seconds": round(compile_seconds() - c0, 4),
            "final_population": size}
  hypervolume = final_lib.front_hypervolumes(front, cfg)
  if run is not None:
    write_outputs(run, cfg, front, uniform, history, labels)
    run.record(timing=timing, final_hypervolume=hypervolume)
  return SearchResult(front=front, archive=jax.tree.map(np.asarray, state.archive.to_dict()),
                      history=history, config=cfg, out_dir=None if run is None else run.path,
                      uniform=uniform, hypervolume=hypervolume)


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
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
    state, history = restored["state"], list(restored["history"])
    if jax.tree.structure(state) != expected or len(history) != int(state.generation) + 1:
      raise ValueError(f"step {step} does not hold this run's state")
    return _canonical(state), history

  step, (state, history), problems = ckpt_lib.restore_newest_good(
      manager.all_steps(), restore, run.checkpoints)
  damaged = ckpt_lib.set_aside(manager, step, run.damaged)
  if damaged:
    tqdm.write(f"resume: checkpoint step(s) {damaged} in {run.checkpoints} could not be "
               f"restored ({'; '.join(problems)}); resumed from step {step}, moved the "
               f"damaged step(s) to {run.damaged}")
  for row in history:  # a run saved before the column existed
    row.setdefault("compile_seconds", 0.0)
  return state, history


def _save(manager, state, history):
  """Writes generation ``state.generation``; on failure the previous step stays intact."""
  if manager is None:
    return
  ckpt_lib.save_step(manager, int(state.generation), ocp.args.Composite(
      state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)))


def _write_partial(run: RunDir | None, problem, state, history, labels) -> None:
  """On a stop: the front and history so far, readable (no final-phase accuracy)."""
  if run is None:
    return
  run.write_members(FRONT_FILE, final_lib.front_members(problem, state.archive, labels))
  run.write_history(history)


def _postfix(bar, row: Mapping, labels):
  bar.set_postfix_str(f"evals={row['evaluations']} hv={row['hypervolume']:.4f} sizes="
                      + "/".join(str(row[f'size:{l}']) for l in labels))
