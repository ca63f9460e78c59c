"""``search()``: the researcher-facing entry point (also behind ``nemo-jax search``).

Runs the engine generation by generation with a progress bar, checkpoints the whole
search state with orbax after every generation (a killed run resumes with
``resume=True`` and ends with the same ``front.json`` as an uninterrupted one), and
writes the results: ``config.json`` (resolved config, package versions, seed),
``front.json``, ``history.csv``, ``uniform.json``, ``front.png`` and ``species.png``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import shutil
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from nemo_jax._src import data as data_lib
from nemo_jax import pareto
from nemo_jax._src import faults
from nemo_jax._src.data.files import ImageFiles
from nemo_jax._src.config import QuantConfig
from nemo_jax._src.search import report
from nemo_jax._src.search.config import (ACCURACY_OBJECTIVES, IN_MEMORY_DATASET, USER_MODEL,
                                         SearchConfig, load_search_config,
                                         search_registries, species_labels)
from nemo_jax._src.search.engine import Engine
from nemo_jax._src.problem import (Problem, build_problem, data_splits, selection_data,
                                   split_arrays)
from nemo_jax._src.registries import Registries

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"
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
    hypervolume: the final front's hypervolume per image set (``front_hypervolumes``):
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


def raw_names_for(problem: Problem) -> tuple[str, ...]:
  names = list(problem.cost_names)
  if problem.needs_accuracy:
    names += list(ACCURACY_OBJECTIVES)
  return tuple(names)


def _raw_matrix(raw: Mapping[str, np.ndarray], names) -> np.ndarray:
  return np.stack([np.asarray(raw[n], np.float32) for n in names], axis=-1)


def _score(problem: Problem, batch, raw_names):
  """Decodes and scores a batch; returns device arrays and the accuracy seconds."""
  configs = problem.decode(batch.choice, batch.keep_idx)
  F, violation, raw, acc_seconds = problem.objectives(configs, timed=True)
  return (jnp.asarray(F), jnp.asarray(violation), jnp.asarray(_raw_matrix(raw, raw_names)),
          acc_seconds)


def _members(problem: Problem, choice, keep_idx, species, generation, raw, raw_names, labels):
  configs = problem.decode(jnp.asarray(choice), jnp.asarray(keep_idx))
  out = []
  for i in range(len(keep_idx)):
    metrics = {n: float(raw[i, j]) for j, n in enumerate(raw_names)}
    out.append({
        "w_bits": [int(b) for b in np.asarray(configs.w_bits[i])],
        "a_bits": [int(b) for b in np.asarray(configs.a_bits[i])],
        "keep": float(configs.keep[i]),
        "species": labels[int(species[i])] if species is not None else "uniform",
        "generation": int(generation[i]) if generation is not None else 0,
        "objectives": {n: metrics[n] for n in problem.objective_names},
        "metrics": metrics,
    })
  return out


def front_members(problem: Problem, archive, raw_names, labels) -> list[dict]:
  """The feasible non-dominated archive as a list of dicts, sorted by objectives."""
  a = jax.tree.map(np.asarray, archive)
  ok = a.valid & (a.violation <= 0)
  if not ok.any():  # nothing feasible: report the least-violating configurations
    ok = a.valid & (a.violation <= a.violation[a.valid].min(initial=np.inf))
  idx = np.nonzero(ok)[0]
  idx = idx[np.lexsort(tuple(a.F[idx, j] for j in reversed(range(a.F.shape[1]))))]
  return _members(problem, a.choice[idx], a.keep_idx[idx], a.species[idx],
                  a.generation[idx], a.raw[idx], raw_names, labels)


def final_source(problem: Problem):
  """``(images, labels, preprocess)`` of the final re-evaluation (``final_split`` subset).

  ``preprocess`` is None when ``images`` are already preprocessed.
  """
  cfg = problem.cfg
  images, labels = split_arrays(cfg, cfg.final_split, problem.data)
  classes = cfg.resolved_num_classes or problem.source.num_classes
  per_class = max(1, min(cfg.final_max_images // classes, int(np.bincount(labels).min())))
  idx = data_lib.stratified_subset(labels, per_class, seed=cfg.seed)
  if isinstance(images, ImageFiles):  # lazy file list: decoded block by block
    return images.subset(idx), labels[idx], None
  return images[idx], labels[idx], None


def materialise(source) -> tuple[np.ndarray, np.ndarray]:
  """``(images preprocessed, labels)`` in memory from an ``(images, labels, preprocess)``
  source (``final_source``, ``report_sets``)."""
  images, labels, pre = source
  images = np.asarray(images)
  return (images if pre is None else pre(images)), labels


def final_data(problem: Problem):
  """``(images preprocessed, labels)`` the final front is re-evaluated on (in memory)."""
  return materialise(final_source(problem))


def report_sets(problem: Problem) -> dict:
  """``{member key: (images, labels, preprocess)}``: the sets every front member and
  uniform baseline is re-evaluated on after the search (``docs/DESIGN.md``, "Image
  sets"): ``selection_top1`` on the selection set (held-out ``eval_split`` images;
  reports pick members by it) and ``final_top1`` on the ``final_split`` subset (the test
  set, only reported, streamed from files when they are large); each only when
  configured."""
  cfg, sets = problem.cfg, {}
  if cfg.selection_per_class > 0:
    sets["selection_top1"] = (*selection_data(cfg, problem.data), None)
  if cfg.final_split is not None:
    sets["final_top1"] = final_source(problem)
  return sets


HYPERVOLUME_SETS = {"fitness": None, "selection": "selection_top1", "test": "final_top1"}
"""Image set -> the member key whose top-1 replaces the fitness top-1 error (None: the
searched objectives themselves)."""


def front_objectives(members: Sequence[dict], cfg: SearchConfig,
                     images: str = "fitness") -> np.ndarray | None:
  """``[N, M]`` normalised objectives of members, the ``top1_error`` objective taken on
  ``images``.

  ``images``: ``fitness`` (what the search optimised: in sample), ``selection`` or
  ``test`` (``selection_top1`` / ``final_top1`` of the final phase: out of sample;
  ``docs/DESIGN.md``, "Image sets").

  Returns:
    The matrix, or None when ``images`` was not measured (a member lacks the key, or
    ``top1_error`` is not an objective).

  Raises:
    ValueError: ``images`` is not one of ``HYPERVOLUME_SETS``.
  """
  if images not in HYPERVOLUME_SETS:
    raise ValueError(f"images={images!r}; allowed: {list(HYPERVOLUME_SETS)}")
  names, key = list(cfg.objectives), HYPERVOLUME_SETS[images]
  F = np.asarray([[m["objectives"][n] for n in names] for m in members],
                 np.float64).reshape(len(members), len(names))
  if key is not None:
    if "top1_error" not in names or any(key not in m for m in members):
      return None
    F[:, names.index("top1_error")] = [1.0 - m[key] for m in members]
  return F


def front_hypervolume(members: Sequence[dict], cfg: SearchConfig,
                      images: str = "fitness") -> float | None:
  """Hypervolume (reference ``cfg.hv_ref``, default 1 per objective) of
  ``front_objectives(members, cfg, images)``; members that the other image set makes
  dominated add nothing. 0.0 for no members, None when ``images`` was not measured."""
  F = front_objectives(members, cfg, images)
  if F is None or not len(F):
    return None if F is None else 0.0
  ref = cfg.hv_ref if cfg.hv_ref is not None else [1.0] * len(cfg.objectives)
  return float(pareto.hypervolume(jnp.asarray(F, jnp.float32), jnp.asarray(ref, jnp.float32)))


def front_hypervolumes(members: Sequence[dict], cfg: SearchConfig) -> dict[str, float]:
  """``{image set: front_hypervolume}`` for every set the members were measured on."""
  hv = {k: front_hypervolume(members, cfg, k) for k in HYPERVOLUME_SETS}
  return {k: v for k, v in hv.items() if v is not None}


FINAL_PAD = 8
"""Final-phase members per device are padded to a multiple of this (``final_size``)."""


def final_size(problem: Problem, members: int) -> int:
  """The one population size of the final phase (uniform baselines + final re-evaluation).

  ``members`` padded to a multiple of ``FINAL_PAD`` per device: fewer than
  ``FINAL_PAD`` wasted slots per device, and when that equals the generation's padded
  size (``problem.evaluator``'s) the final phase compiles nothing.
  """
  unit = FINAL_PAD * problem.evaluator.num_devices
  return max(unit, -(-members // unit) * unit)


def _final_accuracy(problem: Problem, data, members: list[dict],
                    pad_to: int | None = None, key: str = "final_top1") -> None:
  """Adds ``key`` (top-1 fraction on the images of ``data``, an ``(images, labels,
  preprocess)`` source) to every member, in place.

  All members in ONE call of the fitness evaluator's compiled function, the images
  streamed through it in blocks of its shape (``Evaluator.run_images``).
  """
  if not members:
    return
  images, labels, pre = data
  configs = problem.configs([m["keep"] for m in members], [m["w_bits"] for m in members],
                            [m["a_bits"] for m in members])
  top1 = np.asarray(problem.evaluator.run_images(configs, images, labels, preprocess=pre,
                                                 pad_to=pad_to).top1)
  for m, t in zip(members, top1):
    m[key] = float(t)


def uniform_baselines(problem: Problem, raw_names, pad_to: int | None = None) -> list[dict]:
  """Uniform precision W = A = b for every bit choice (keep = largest keep choice).

  ``pad_to``: the population size to evaluate them as (``final_size``; None: the
  generation's).
  """
  cfg = problem.cfg
  k = len(cfg.bit_choices)
  choice = jnp.tile(jnp.arange(k, dtype=jnp.int32)[:, None], (1, len(problem.space.active_nodes)))
  keep_idx = jnp.full((k,), len(cfg.keep_choices) - 1, jnp.int32)
  configs = problem.decode(choice, keep_idx)
  _, _, raw = problem.objectives(configs, pad_to=pad_to)
  members = _members(problem, choice, keep_idx, None, None, _raw_matrix(raw, raw_names),
                     raw_names, None)
  for m, b in zip(members, cfg.bit_choices):
    m["bits"] = int(b)
  return members


def check_feasibility(problem: Problem, archive, raw_names, labels) -> str | None:
  """After generation 0: if no configuration meets the constraints, say so.

  Names every bound and the closest configuration found (least total violation). With
  ``cfg.infeasible == "error"`` this raises ValueError, otherwise it warns (and prints
  the message) and the search goes on.

  Returns:
    The message, or None when a feasible configuration exists (or nothing is bounded).
  """
  cfg = problem.cfg
  if not cfg.constraints:
    return None
  a = jax.tree.map(np.asarray, archive)
  valid = a.valid
  if not valid.any() or (valid & (a.violation <= 0)).any():
    return None
  i = int(np.argmin(np.where(valid, a.violation, np.inf)))
  m = _members(problem, a.choice[i:i + 1], a.keep_idx[i:i + 1], a.species[i:i + 1],
               a.generation[i:i + 1], a.raw[i:i + 1], raw_names, labels)[0]
  bounds = ", ".join(f"{n} <= {b!r} (closest has {m['metrics'][n]:.6g})"
                     for n, b in cfg.constraints.items())
  msg = (f"constraints: no configuration of generation 0 meets {bounds}; closest "
         f"configuration: keep={m['keep']:.4g}, w_bits={m['w_bits']}, a_bits={m['a_bits']}")
  if cfg.infeasible == "error":
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


def _record_summary(out_dir, **entries) -> None:
  """Adds the run's ``timing`` (search / final seconds, compile seconds) and
  ``final_hypervolume`` (per image set) to config.json."""
  path = os.path.join(out_dir, report.CONFIG_FILE)
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError):
    return
  saved.update(entries)
  report.write_json(path, saved)


def _canonical(tree):
  """Host copy with strong dtypes (so the first and a resumed call compile the same)."""
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)


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
    problem: a prebuilt Problem (e.g. with a custom model); must match the config.
    registries: user costs and species the config names (``nemo_jax.Registries``);
      plugins named in the config itself (``custom_costs`` / ``custom_species``) are
      imported too, also on resume.
    callback: called with each generation's history row.
    overwrite: replace a previous run in ``out_dir`` (without it, a directory that
      already holds a run is an error: pass ``resume=True`` or another directory).
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
      whose overrides contradict the saved run, or a run directory with no checkpoint
      that restores (``docs/DESIGN.md``, "Faults").
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
  if resume:
    cfg = _resumed_config(out_dir, config, registries, overrides)
  else:
    cfg = load_search_config(config, registries, **overrides)
    if out_dir is not None:
      _claim_out_dir(out_dir, overwrite)
  if out_dir is not None:
    # Before any work: an unwritable directory or a full disk is an error now, not after
    # the calibration and generation 0.
    faults.probe_writable(out_dir, what="out_dir")
  if splits is not None and cfg.num_classes is None:
    cfg = dataclasses.replace(
        cfg, num_classes=int(max(int(y.max()) for _, y in splits.values()) + 1))
  if splits is not None and cfg.final_split is not None and cfg.final_split not in splits:
    if not isinstance(data, (tuple, list)):
      raise ValueError(f"final_split={cfg.final_split!r} is not in data (splits "
                       f"{sorted(splits)}); allowed: one of {sorted(splits)} or None")
    cfg = dataclasses.replace(cfg, final_split=None)
  problem = problem or build_problem(cfg, registries, progress=progress, model=model,
                                     variables=variables, data=splits)
  labels = species_labels(cfg.species)
  raw_names = raw_names_for(problem)
  engine = Engine(cfg, problem.space, problem.graph, int(problem.graph.nodes.shape[-1]),
                  raw_names, search_registries(cfg, registries).species)
  hv_ref = jnp.asarray(cfg.hv_ref if cfg.hv_ref is not None else [1.0] * len(cfg.objectives),
                       jnp.float32)
  hv_fn = jax.jit(engine.hypervolume)

  manager = None
  if out_dir is not None:
    template, _ = jax.eval_shape(engine.init_state, jax.random.key(cfg.seed))
    faults.probe_writable(out_dir, _checkpoint_bytes(template) * (MAX_TO_KEEP + 1), "out_dir")
    if not resume:
      report.write_json(os.path.join(out_dir, report.CONFIG_FILE),
                        {"config": cfg.to_dict(), "seed": cfg.seed,
                         "versions": package_versions()})
    manager = _manager(out_dir)

  state, history = None, []
  if resume and manager is not None and manager.all_steps():
    state, history = _restore(manager, out_dir, engine, cfg)
    for row in history:  # a run saved before the column existed
      row.setdefault("compile_seconds", 0.0)

  hint = (f"resume with: nemo-jax search --resume {out_dir}" if out_dir is not None
          else "nothing was saved (out_dir=None)")
  bar = tqdm(total=cfg.generations + 1, disable=not progress, desc="search", unit="gen")
  with faults.GracefulStop(hint) as stop:
    if state is None:
      t0, c0 = time.perf_counter(), compile_seconds()
      state, batch = engine.init_state(jax.random.key(cfg.seed))
      F, viol, raw, acc_s = _score(problem, batch, raw_names)
      state = _canonical(engine.finish_init(state, batch, F, viol, raw))
      hv = hv_fn(state.archive, hv_ref)
      history.append(_history_row(0, state, None, hv, labels, time.perf_counter() - t0, acc_s,
                                  compile_seconds() - c0))
      _save(manager, state, history)
      check_feasibility(problem, state.archive, raw_names, labels)
    else:
      bar.update(int(state.generation))
    bar.update(1)
    _postfix(bar, history[-1], labels)

    while True:
      if stop.requested:
        bar.close()
        _write_partial(out_dir, problem, state, history, raw_names, labels)
        stop.check()
      if int(state.generation) >= cfg.generations:
        break
      t0, c0 = time.perf_counter(), compile_seconds()
      proposal, batch = engine.propose(state)
      F, viol, raw, acc_s = _score(problem, batch, raw_names)
      state, metrics = engine.select(state, proposal, batch, F, viol, raw)
      hv = hv_fn(state.archive, hv_ref)
      row = _history_row(int(state.generation), state, metrics, hv, labels,
                         time.perf_counter() - t0, acc_s, compile_seconds() - c0)
      history.append(row)
      _save(manager, state, history)
      if callback is not None:
        callback(row)
      bar.update(1)
      _postfix(bar, row, labels)
  bar.close()

  t0, c0 = time.perf_counter(), compile_seconds()
  front = front_members(problem, state.archive, raw_names, labels)
  sets = report_sets(problem)
  size = uniform_size = None
  if sets:
    size = final_size(problem, len(front) + len(cfg.bit_choices))
    # The baselines' fitness call: the smaller of the two compiled sizes that holds them.
    generation_size = problem.evaluator.padded_size(cfg.population)
    uniform_size = min(s for s in (size, generation_size) if s >= len(cfg.bit_choices))
  uniform = uniform_baselines(problem, raw_names, pad_to=uniform_size)
  for key, data in sets.items():
    _final_accuracy(problem, data, front + uniform, pad_to=size, key=key)
  timing = {"search_seconds": round(sum(r["seconds"] for r in history), 4),
            "search_compile_seconds": round(sum(r.get("compile_seconds", 0.0)
                                                for r in history), 4),
            "final_seconds": round(time.perf_counter() - t0, 4),
            "final_compile_seconds": round(compile_seconds() - c0, 4),
            "final_population": size}
  hypervolume = front_hypervolumes(front, cfg)
  if out_dir is not None:
    write_outputs(out_dir, cfg, front, uniform, history, labels)
    _record_summary(out_dir, timing=timing, final_hypervolume=hypervolume)
  return SearchResult(front=front, archive=jax.tree.map(np.asarray, state.archive.to_dict()),
                      history=history, config=cfg, out_dir=out_dir, uniform=uniform,
                      hypervolume=hypervolume)


def write_outputs(out_dir, cfg, front, uniform, history, labels):
  report.write_json(os.path.join(out_dir, report.FRONT_FILE), front)
  report.write_json(os.path.join(out_dir, report.UNIFORM_FILE), uniform)
  report.write_history(os.path.join(out_dir, report.HISTORY_FILE), history)
  if front:
    report.plot_front(out_dir, front, cfg.objectives, uniform)
  report.plot_species(out_dir, history, labels)


def _manager(out_dir) -> ocp.CheckpointManager:
  return faults.checkpoint_manager(os.path.join(out_dir, CHECKPOINT_DIR), MAX_TO_KEEP)


def _checkpoint_bytes(template) -> int:
  """Bytes one checkpoint of the search state takes (array data; metadata extra)."""
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(template)
                 if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype,
                                                                      jax.dtypes.prng_key)))


def _claim_out_dir(out_dir, overwrite: bool) -> None:
  """A new run never writes over a previous run's results unless asked to."""
  previous = [f for f in (report.CONFIG_FILE, CHECKPOINT_DIR, report.FRONT_FILE)
              if os.path.exists(os.path.join(out_dir, f))]
  if not previous:
    return
  if not overwrite:
    raise ValueError(f"out_dir={out_dir!r} already holds a run ({', '.join(previous)}); "
                     "allowed: resume it (--resume DIR / resume=True), another directory, "
                     "or --overwrite / overwrite=True to replace it")
  for d in (CHECKPOINT_DIR, DAMAGED_DIR):
    shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)


def _resumed_config(out_dir, config, registries, overrides) -> SearchConfig:
  """The saved run's config; an override may only change ``RESUME_OVERRIDES``."""
  path = None if out_dir is None else os.path.join(out_dir, report.CONFIG_FILE)
  if path is None or not os.path.exists(path):
    raise ValueError(f"resume: {out_dir!r} holds no previous run ({report.CONFIG_FILE} missing)")
  try:
    with open(path) as f:
      saved = json.load(f)["config"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"resume: {path} is not a run's config ({type(e).__name__}: {e}); "
                     "allowed: the config.json written by nemo-jax search") from None
  saved_cfg = load_search_config(saved, registries)
  asked = {k: x for k, x in overrides.items() if x is not None}
  if config is not None:
    given = load_search_config(config, registries, **asked).to_dict()
    asked = {k: x for k, x in given.items() if x != saved_cfg.to_dict()[k]} | asked
  cfg = load_search_config(saved, registries, **asked)
  faults.check_resume_settings(cfg.to_dict(), saved_cfg.to_dict(), RESUME_OVERRIDES, out_dir,
                               "start a new run in another directory to change it")
  return cfg


def _restore(manager, out_dir, engine, cfg):
  """The newest checkpoint that restores completely; damaged newer steps are moved aside."""
  template, _ = jax.eval_shape(engine.init_state, jax.random.key(cfg.seed))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
  expected = jax.tree.structure(abstract)

  def restore(step):
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
    state, history = restored["state"], list(restored["history"])
    if jax.tree.structure(state) != expected or len(history) != int(state.generation) + 1:
      raise ValueError(f"step {step} does not hold this run's state")
    return _canonical(state), history

  directory = os.path.join(out_dir, CHECKPOINT_DIR)
  step, (state, history), problems = faults.restore_latest_good(
      manager.all_steps(), restore, directory)
  damaged = [s for s in manager.all_steps() if s > step]
  if damaged:
    os.makedirs(os.path.join(out_dir, DAMAGED_DIR), exist_ok=True)
    for s in damaged:
      # Kept (not deleted) for inspection; out of the way of the steps to come.
      shutil.move(os.path.join(directory, str(s)),
                  os.path.join(out_dir, DAMAGED_DIR, f"{s}.{int(time.time())}"))
    manager.reload()
    tqdm.write(f"resume: checkpoint step(s) {damaged} in {directory} could not be restored "
               f"({'; '.join(problems)}); resumed from step {step}, moved the damaged "
               f"step(s) to {os.path.join(out_dir, DAMAGED_DIR)}")
  return state, history


def _save(manager, state, history):
  """Writes generation ``state.generation``; on failure the previous step stays intact."""
  if manager is None:
    return
  save_checkpoint_step(manager, int(state.generation), ocp.args.Composite(
      state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(history)))


def save_checkpoint_step(manager, step: int, args) -> None:
  """Writes checkpoint ``step`` completely; on failure the previous step stays intact."""
  try:
    manager.save(step, args=args)
    # Finished before the next generation starts: a stop or a failure never leaves a
    # half-written newest step, and write errors surface here, at their step.
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001 - orbax wraps OS errors in several types
    previous = [s for s in manager.all_steps() if s < step]
    kept = (f"the previous checkpoint (step {max(previous)}) is intact; free space and "
            "resume with --resume" if previous else "no earlier checkpoint exists")
    raise faults.CheckpointWriteError(
        f"writing checkpoint step {step} to {manager.directory} failed "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); {kept}") from e


def _write_partial(out_dir, problem, state, history, raw_names, labels) -> None:
  """On a stop: the front and history so far, readable (no final-phase accuracy)."""
  if out_dir is None:
    return
  front = front_members(problem, state.archive, raw_names, labels)
  report.write_json(os.path.join(out_dir, report.FRONT_FILE), front)
  report.write_history(os.path.join(out_dir, report.HISTORY_FILE), history)


def _postfix(bar, row, labels):
  bar.set_postfix_str(f"evals={row['evaluations']} hv={row['hypervolume']:.4f} sizes="
                      + "/".join(str(row[f'size:{l}']) for l in labels))
