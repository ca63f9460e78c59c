"""EMOMC stage I: the trainer of a library of pre-pruned models, one per keep ratio.

For every target keep ratio ``p`` (fraction of weights KEPT) the trained model is
pruned in ``steps`` steps of unstructured magnitude pruning, each followed by
retraining with the masks fixed (EMOMC: 32 steps of 1 epoch). Step ``k`` of a ratio
that starts from a model with keep ``p0`` keeps ``p0 * (p / p0) ** (k / steps)`` of the
weights of every conv/dense kernel (per-step keep factor ``(p / p0) ** (1 / steps)``),
so after the last step exactly ``round(N * p)`` weights of a kernel with ``N`` weights
are non-zero. Biases and BatchNorm are never pruned (they are retrained).

Schedules:

* ``"independent"`` (EMOMC): every ratio starts from the trained model (``p0 = 1``).
  Costs ``steps`` stages per ratio.
* ``"chain"`` (cheaper): ratios are processed in DESCENDING order and each starts from
  the nearest already pruned denser model of the library (``p0`` = its keep), so the
  later ratios only prune the small remaining gap. Same number of stages per ratio, but
  each stage removes fewer weights, so ``steps`` can be much smaller.

Retraining: SGD with momentum at a constant learning rate on the training split,
gradients and weights of pruned entries masked to zero after every update (masked
SGD: pruned weights stay exactly zero, their momentum stays zero). One stage is
``epochs_per_step`` epochs, or ``steps_per_stage`` optimizer steps when given (use this
for quick CPU runs: the paper's setting is 32 x 1 epoch).

The settings are one validated :class:`LibraryConfig` (``nemo-jax prune-library
--config FILE`` reads ``get_library_config()``). Files are written by ``io.py``; masks
come from ``masks.py``. Building is resumable: ratios already recorded in
``library.json`` (with their checkpoint present) are skipped, and every ratio's
training uses its own PRNG seed, so an interrupted build resumed later gives the same
library.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from nemo_jax._src import checkpoint as ckpt
from nemo_jax._src import data as data_lib
from nemo_jax._src import models as models_lib
from nemo_jax._src import train as train_lib
from nemo_jax._src import validate as v
from nemo_jax._src.emomc.io import (DENSE_KEEP, LIBRARY_FILE, LIBRARY_FORMAT,
                                    check_keep_ratios, entry_dir, load_entry,
                                    parse_keep_range, ratio_id, ratio_key, read_library)
from nemo_jax._src.emomc.masks import is_kernel_path, magnitude_masks, nonzero_counts
from nemo_jax._src.faults import DirLock, GracefulStop, probe_writable, write_json
from nemo_jax._src.run.checkpoint import save_tree
from nemo_jax._src.run.rundir import CONFIG_FILE, FRONT_FILE, HISTORY_FILE

RUN_FILES = (CONFIG_FILE, FRONT_FILE, HISTORY_FILE)
"""Files of a search run: a directory holding one is never a library's."""

SCHEDULES = ("independent", "chain")

# Settings that must be equal for a resumed build to extend a library.
_SETTING_KEYS = ("model", "input_shape", "num_classes", "dataset", "checkpoint", "steps",
                 "epochs_per_step", "steps_per_stage", "schedule", "batch_size",
                 "learning_rate", "momentum", "weight_decay", "augment", "train_max_images",
                 "seed")


@dataclasses.dataclass(frozen=True)
class LibraryConfig:
  """Stage-I settings (``experiments/configs/emomc_default.py:get_library_config``).

  Attributes:
    model: zoo model name; checkpoint: ``"default"`` or a variables file.
    dataset, data_dir: retraining data (its ``train`` split, local files only).
    input_shape, num_classes: default: the dataset's.
    out_dir: the library directory (an existing one is resumed).
    keep_ratios: target keep ratios p (fraction of weights KEPT), in (0, 1]; or
      keep_range: ``"START:STOP:STEP"`` (STOP included), e.g. ``"0.2:0.8:0.01"``.
    steps: pruning steps per ratio (EMOMC: 32).
    epochs_per_step: retraining epochs per step (EMOMC: 1); may be a fraction.
    steps_per_stage: optimizer steps per pruning step; overrides ``epochs_per_step``.
    schedule: ``"independent"`` (EMOMC) or ``"chain"`` (module docstring).
    batch_size, learning_rate, momentum, weight_decay, augment: retraining settings.
    eval_split, eval_max_images: where each pruned model's accuracy is measured.
    train_max_images: retrain on a stratified subset of this size (None: all).
    seed: base PRNG seed (each ratio derives its own from it).
  """
  model: str = models_lib.DEFAULT_MODEL
  checkpoint: str = "default"
  dataset: str = "fashion_mnist_embedded"
  data_dir: str | None = None
  input_shape: tuple[int, int, int] | None = None
  num_classes: int | None = None
  out_dir: str | None = None
  keep_ratios: tuple[float, ...] | None = None
  keep_range: str | None = None
  steps: int = 32
  epochs_per_step: float = 1.0
  steps_per_stage: int | None = None
  schedule: str = "independent"
  batch_size: int = 128
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  augment: bool = True
  eval_split: str = "test"
  eval_max_images: int | None = None
  train_max_images: int | None = None
  seed: int = 0

  @property
  def ratios(self) -> tuple[float, ...]:
    """The validated keep ratios (from ``keep_ratios`` or ``keep_range``)."""
    if self.keep_range is not None:
      return parse_keep_range(self.keep_range)
    return check_keep_ratios(self.keep_ratios)


def library_config(d: Mapping[str, Any] | LibraryConfig | None = None,
                   **overrides) -> LibraryConfig:
  """Validates stage-I settings (a mapping, a LibraryConfig, or None for the defaults).

  ``overrides`` that are not None replace fields (the CLI's flags).

  Raises:
    ValueError naming the field, the value and the allowed values.
  """
  if isinstance(d, LibraryConfig):
    d = dataclasses.asdict(d)
  d = dict(d or {})
  v.known_keys("library config", d, (f.name for f in dataclasses.fields(LibraryConfig)))
  d.update({k: x for k, x in overrides.items() if x is not None})
  if d.get("keep_range") is not None and overrides.get("keep_range") is not None:
    d["keep_ratios"] = None  # a --keep-range flag replaces the file's list
  if d.get("keep_ratios") is not None:
    d["keep_ratios"] = check_keep_ratios(v.sequence("keep_ratios", d["keep_ratios"]))
  if d.get("input_shape") is not None:
    d["input_shape"] = v.input_shape("input_shape", d["input_shape"])
  cfg = LibraryConfig(**d)
  models_lib.check_model_name(cfg.model)
  v.nonempty_string("checkpoint", cfg.checkpoint, "'default' or a variables file path")
  v.choice("dataset", cfg.dataset, sorted(data_lib.DATASETS))
  v.optional_integer("num_classes", cfg.num_classes, 1)
  if cfg.out_dir is None:
    raise ValueError("out_dir=None is invalid; allowed: the library directory (--out DIR)")
  if (cfg.keep_ratios is None) == (cfg.keep_range is None):
    raise ValueError("keep_ratios / keep_range: give exactly one (e.g. --keep-range "
                     "0.2:0.8:0.01)")
  cfg.ratios  # validates either form
  v.integer("steps", cfg.steps, 1)
  v.number("epochs_per_step", cfg.epochs_per_step, 0.0, open_lo=True)
  v.optional_integer("steps_per_stage", cfg.steps_per_stage, 1)
  v.choice("schedule", cfg.schedule, SCHEDULES)
  v.integer("batch_size", cfg.batch_size, 1)
  v.number("learning_rate", cfg.learning_rate, 0.0, open_lo=True)
  v.number("momentum", cfg.momentum, 0.0, 1.0)
  v.number("weight_decay", cfg.weight_decay, 0.0)
  v.boolean("augment", cfg.augment)
  v.choice("eval_split", cfg.eval_split, data_lib.DATASETS[cfg.dataset].splits)
  v.optional_integer("eval_max_images", cfg.eval_max_images, 1)
  v.optional_integer("train_max_images", cfg.train_max_images, 1)
  v.seed("seed", cfg.seed)
  return cfg


def _make_masked_step(model, tx, label_smoothing=0.0):
  """Jitted masked SGD step; gradients and weights of pruned entries stay zero."""

  @jax.jit
  def step(params, batch_stats, opt_state, masks, x, y):
    def loss_fn(p):
      logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, None,
                                    train=True, mutable=["batch_stats"])
      return train_lib.cross_entropy(logits, y, label_smoothing), updates["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grads = jax.tree.map(lambda g, m: g * m, grads, masks)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # Re-apply the masks: exact zeros whatever the optimizer does (e.g. weight decay).
    params = jax.tree.map(lambda p, m: (p * m).astype(p.dtype), params, masks)
    return params, new_stats, opt_state, loss

  return step


def _optimizer(learning_rate, momentum, weight_decay):
  mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: is_kernel_path(path), params)
  return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask),
                     optax.sgd(learning_rate, momentum=momentum or None, nesterov=bool(momentum)))


@dataclasses.dataclass
class _Data:
  x_train: np.ndarray
  y_train: np.ndarray
  x_eval: np.ndarray
  y_eval: np.ndarray


def _load_data(cfg: LibraryConfig) -> _Data:
  x_train, y_train = data_lib.load_split(cfg.dataset, "train", source_dir=cfg.data_dir)
  classes = data_lib.DATASETS[cfg.dataset].num_classes
  if cfg.train_max_images is not None and cfg.train_max_images < len(x_train):
    idx = data_lib.capped_stratified_subset(y_train, cfg.train_max_images, cfg.seed, classes)
    x_train, y_train = x_train[idx], y_train[idx]
  x_eval, y_eval = data_lib.load_split(cfg.dataset, cfg.eval_split, source_dir=cfg.data_dir)
  if cfg.eval_max_images is not None and cfg.eval_max_images < len(x_eval):
    idx = data_lib.capped_stratified_subset(y_eval, cfg.eval_max_images, cfg.seed, classes)
    x_eval, y_eval = x_eval[idx], y_eval[idx]
  return _Data(x_train, y_train, data_lib.preprocess(cfg.dataset, x_eval), y_eval)


def build_library(cfg: LibraryConfig | Mapping[str, Any], model=None, variables=None,
                  progress: bool = True) -> dict:
  """Builds (or resumes) a library of pruned + retrained models, one per keep ratio.

  Args:
    cfg: the settings (:class:`LibraryConfig` or a mapping of its fields).
    model, variables: the trained model; default: ``cfg.model`` loaded from
      ``cfg.checkpoint``.
    progress: show a progress bar (optimizer steps of the ratios still to build).

  Returns:
    The ``library.json`` content plus ``"built"`` (ratios trained by this call) and
    ``"skipped"`` (ratios found finished).

  Raises:
    ValueError: bad settings (naming the field), or an existing library in ``out_dir``
      built with different settings.
  """
  cfg = library_config(cfg)
  # One writer per directory, and never a search run's directory.
  with DirLock(cfg.out_dir, "nemo-jax prune-library", "out_dir"):
    run_files = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, f))]
    if run_files:
      raise ValueError(f"out_dir={cfg.out_dir!r} holds a search run ({', '.join(run_files)});"
                       " allowed: a library directory of its own (e.g. runs/library), "
                       "named by the search's library=DIR")
    return _build(cfg, model, variables, progress)


def _build(cfg: LibraryConfig, model, variables, progress: bool) -> dict:
  """:func:`build_library` in its locked directory."""
  ratios = cfg.ratios
  info = data_lib.DATASETS[cfg.dataset]
  shape = tuple(cfg.input_shape or info.input_shape)
  classes = cfg.num_classes or info.num_classes
  if model is None:
    model, variables = ckpt.load_model(cfg.model, cfg.checkpoint, shape, classes,
                                       dataset=cfg.dataset)
  steps, batch_size, seed, out_dir = cfg.steps, cfg.batch_size, cfg.seed, cfg.out_dir
  variables = jax.tree.map(jnp.asarray, {"params": variables["params"],
                                         "batch_stats": variables.get("batch_stats", {})})
  settings = {
      "model": cfg.model,
      "input_shape": list(shape), "num_classes": classes,
      "dataset": cfg.dataset, "checkpoint": cfg.checkpoint, "steps": steps,
      "epochs_per_step": float(cfg.epochs_per_step), "steps_per_stage": cfg.steps_per_stage,
      "schedule": cfg.schedule, "batch_size": batch_size,
      "learning_rate": float(cfg.learning_rate), "momentum": float(cfg.momentum),
      "weight_decay": float(cfg.weight_decay), "augment": bool(cfg.augment),
      "train_max_images": cfg.train_max_images, "seed": seed,
      "eval_split": cfg.eval_split, "eval_max_images": cfg.eval_max_images,
      "data_dir": cfg.data_dir,
  }
  entry_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(variables))
  # Before any training: an unwritable directory or a disk without room for the entries.
  probe_writable(out_dir, entry_bytes * (len(ratios) + 1), "out_dir")
  lib_path = os.path.join(out_dir, LIBRARY_FILE)
  if os.path.exists(lib_path):
    meta = read_library(out_dir)
    for k in _SETTING_KEYS:
      if meta["settings"].get(k) != settings[k]:
        raise ValueError(f"{out_dir}: the library there was built with {k}="
                         f"{meta['settings'].get(k)!r}, this call has {k}={settings[k]!r}; "
                         "use the same settings to resume or another --out")
  else:
    meta = {"format": LIBRARY_FORMAT, "settings": settings, "entries": {}}

  def finished(p):
    e = meta["entries"].get(ratio_key(p))
    return e is not None and os.path.isdir(os.path.join(out_dir, e["checkpoint"]))

  for p in [p for p in ratios if finished(p)]:
    try:  # a damaged entry (e.g. a write cut short) is rebuilt, not trusted
      load_entry(out_dir, p, variables, meta)
    except ValueError as e:
      warnings.warn(f"{e}; rebuilding it", stacklevel=2)
      tqdm.write(f"warning: {e}; rebuilding it", file=sys.stderr)
      del meta["entries"][ratio_key(p)]

  todo = [p for p in ratios if not finished(p)]
  skipped = [p for p in ratios if finished(p)]
  data = _load_data(cfg)
  per_epoch = max(1, len(data.x_train) // batch_size)
  stage_steps = cfg.steps_per_stage or max(1, int(round(cfg.epochs_per_step * per_epoch)))

  def record(p, v, seconds, start_keep):
    top1 = train_lib.float_accuracy(model, v, data.x_eval, data.y_eval)
    counts = nonzero_counts(v["params"])
    rel = entry_dir(p)
    save_tree(os.path.join(out_dir, rel), jax.tree.map(np.asarray, dict(v)),
              f"the entries already in {LIBRARY_FILE} are intact: free space and run the "
              "same command again to resume")
    meta["entries"][ratio_key(p)] = {
        "keep": p, "id": ratio_id(p), "checkpoint": rel, "top1": top1,
        "nonzero": int(sum(c[0] for c in counts.values())),
        "weights": int(sum(c[1] for c in counts.values())),
        "start_keep": start_keep, "seconds": round(seconds, 3)}
    write_json(lib_path, meta)  # atomic: an interrupted build never leaves half a library.json

  tx = _optimizer(cfg.learning_rate, cfg.momentum, cfg.weight_decay)
  step_fn = _make_masked_step(model, tx)
  bar = tqdm(total=len(todo) * steps * stage_steps, disable=not progress, desc="prune-library",
             unit="step")
  built = []
  stop = GracefulStop(f"finished entries are saved in {out_dir}; run the same command "
                      "again to resume (the interrupted ratio restarts)")
  with stop:
    if not finished(DENSE_KEEP):
      record(DENSE_KEEP, variables, 0.0, DENSE_KEEP)
    _build_ratios(cfg, sorted(todo, reverse=True), meta, model, variables, data, info, tx,
                  step_fn, stage_steps, record, bar, built, stop)
  bar.close()
  return {**meta, "built": sorted(built), "skipped": skipped}


def _build_ratios(cfg, todo, meta, model, variables, data, info, tx, step_fn, stage_steps,
                  record, bar, built, stop):
  """Prunes + retrains each ratio of ``todo`` (descending keep), recording each."""
  steps, batch_size, seed, out_dir = cfg.steps, cfg.batch_size, cfg.seed, cfg.out_dir
  for p in todo:  # descending: "chain" needs the denser ones first
    if p == DENSE_KEEP:
      built.append(p)
      continue
    t0 = time.perf_counter()
    start_keep, start = DENSE_KEEP, variables
    if cfg.schedule == "chain":
      denser = [float(e["keep"]) for e in meta["entries"].values() if float(e["keep"]) > p]
      start_keep = min(denser)
      if start_keep != DENSE_KEEP:
        start = jax.tree.map(jnp.asarray, load_entry(out_dir, start_keep, variables, meta))
    params, batch_stats = start["params"], start["batch_stats"]
    opt_state = tx.init(params)
    rng = np.random.default_rng([seed, ratio_id(p)])
    bar.set_postfix_str(f"keep={p:.4f}")
    masks = None
    for k in range(1, steps + 1):
      # A stop discards this ratio's unfinished training whole; finished ones are saved.
      stop.check()
      keep_k = p if k == steps else start_keep * (p / start_keep) ** (k / steps)
      # Magnitudes of the current (already pruned) weights: masks only ever shrink.
      masks = magnitude_masks(params, keep_k)
      params = jax.tree.map(lambda w, m: (w * m).astype(w.dtype), params, masks)
      done = 0
      while done < stage_steps:
        for xb, yb in data_lib.iterate_batches(data.x_train, data.y_train, batch_size,
                                               int(rng.integers(2**31)), shuffle=True,
                                               drop_last=len(data.x_train) >= batch_size):
          if cfg.augment and info.crop_padding:
            xb = data_lib.augment(cfg.dataset, xb, int(rng.integers(2**31)))
          xb = data_lib.preprocess(cfg.dataset, xb)
          params, batch_stats, opt_state, loss = step_fn(
              params, batch_stats, opt_state, masks, jnp.asarray(xb), jnp.asarray(yb))
          done += 1
          bar.update(1)
          if done >= stage_steps:
            break
      bar.set_postfix_str(f"keep={p:.4f} step={k}/{steps} loss={float(loss):.3f}")
    record(p, {"params": params, "batch_stats": batch_stats}, time.perf_counter() - t0,
           start_keep)
    built.append(p)
    stop.check()
