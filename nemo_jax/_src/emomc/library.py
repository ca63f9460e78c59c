"""EMOMC stage I: a library of pre-pruned models, one orbax checkpoint per keep ratio.

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

Files in ``out_dir``: ``library.json`` (format, model, settings, and per ratio its
accuracy, non-zero counts and checkpoint directory) and ``checkpoints/<id>/`` (orbax
``StandardCheckpointer``, ``id = round(p * 10000)``). The trained model itself is
entry ``p = 1.0``. Building is resumable: ratios already recorded in ``library.json``
(with their checkpoint present) are skipped, and every ratio's training uses its own
PRNG seed, so an interrupted build resumed later gives the same library.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from nemo_jax._src import data as data_lib
from nemo_jax._src import quant
from nemo_jax._src import train as train_lib

LIBRARY_FORMAT = "nemo_jax.emomc_library.v1"
LIBRARY_FILE = "library.json"
CHECKPOINT_DIR = "checkpoints"
SCHEDULES = ("independent", "chain")
RATIO_DECIMALS = 4            # keep ratios are identified by round(p * 10^4)
DENSE_KEEP = 1.0

# Settings that must be equal for a resumed build to extend a library.
_SETTING_KEYS = ("model", "input_shape", "num_classes", "dataset", "checkpoint", "steps",
                 "epochs_per_step", "steps_per_stage", "schedule", "batch_size",
                 "learning_rate", "momentum", "weight_decay", "augment", "train_max_images",
                 "seed")


def ratio_id(keep: float) -> int:
  """Integer id of a keep ratio (``round(p * 10000)``), used as checkpoint name."""
  return int(round(float(keep) * 10**RATIO_DECIMALS))


def ratio_key(keep: float) -> str:
  """The ``library.json`` key of a keep ratio (4 decimals, e.g. ``"0.2500"``)."""
  return f"{ratio_id(keep) / 10**RATIO_DECIMALS:.{RATIO_DECIMALS}f}"


def check_keep_ratios(ratios: Sequence[float], field: str = "keep_ratios") -> tuple[float, ...]:
  """Validates keep ratios (in (0, 1], distinct at 4 decimals); returns them rounded, sorted.

  Raises:
    ValueError naming the field and the offending value.
  """
  if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios:
    raise ValueError(f"{field}={ratios!r} is invalid; allowed: a non-empty list of numbers "
                     "in (0, 1]")
  out = []
  for p in ratios:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) \
        or not math.isfinite(float(p)) or not 0 < float(p) <= 1:
      raise ValueError(f"{field}: keep ratio {p!r} is invalid; allowed: numbers in (0, 1]")
    if ratio_id(p) == 0:
      raise ValueError(f"{field}: keep ratio {p!r} rounds to 0 at {RATIO_DECIMALS} decimals; "
                       "allowed: >= 0.0001")
    out.append(ratio_id(p) / 10**RATIO_DECIMALS)
  if len(set(out)) != len(out):
    dup = sorted({p for p in out if out.count(p) > 1})
    raise ValueError(f"{field}: keep ratio(s) {dup} given twice; allowed: distinct ratios")
  return tuple(sorted(out))


def parse_keep_range(text: str) -> tuple[float, ...]:
  """``"0.2:0.8:0.05"`` (start:stop:step, stop included) or ``"0.3,0.5"`` -> ratios.

  Raises:
    ValueError naming the text and the expected form.
  """
  form = "START:STOP:STEP (e.g. 0.2:0.8:0.01, STOP included) or a list 0.3,0.5"
  text = str(text).strip()
  try:
    if ":" in text:
      start, stop, step = (float(v) for v in text.split(":"))
      if not (0 < start <= stop <= 1) or not step > 0:
        raise ValueError
      n = int(math.floor((stop - start) / step + 1e-9)) + 1
      ratios = [start + i * step for i in range(n)]
    else:
      ratios = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"--keep-range {text!r} is invalid; allowed: {form} with 0 < START <= "
                     "STOP <= 1 and STEP > 0") from None
  return check_keep_ratios(ratios, "--keep-range")


# --------------------------------------------------------------------------- masks


def is_kernel_path(path) -> bool:
  """True for the conv/dense kernels (params leaves named ``kernel``): what is pruned."""
  return getattr(path[-1], "key", None) == "kernel"


def kernel_leaves(params) -> dict[str, Any]:
  """``{path: kernel}`` of every prunable kernel (conv/dense weights)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if is_kernel_path(path):
      out[jax.tree_util.keystr(path)] = leaf
  return out


def magnitude_masks(params, keep: float):
  """Float masks keeping exactly ``round(N * keep)`` largest-magnitude weights per kernel.

  Non-kernel leaves get the scalar 1.0 (never pruned). Ties are broken by index
  (``quant.magnitude_ranks``), so the count is exact even when weights are equal.
  """
  def one(path, leaf):
    if not is_kernel_path(path):
      return jnp.ones((), jnp.float32)
    keep_n = quant.keep_count(leaf.size, jnp.float32(keep))
    return (quant.magnitude_ranks(leaf) < keep_n).astype(jnp.float32)
  return jax.tree_util.tree_map_with_path(one, params)


def nonzero_counts(params) -> dict[str, tuple[int, int]]:
  """``{kernel path: (non-zero weights, weights)}``."""
  return {k: (int(np.count_nonzero(np.asarray(v))), int(np.size(v)))
          for k, v in kernel_leaves(params).items()}


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


# --------------------------------------------------------------------------- files


def _abs(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))


def _checkpointer() -> ocp.StandardCheckpointer:
  return ocp.StandardCheckpointer()


def save_entry(out_dir: str, keep: float, variables) -> str:
  """Writes one library entry (orbax); returns its directory relative to ``out_dir``."""
  rel = os.path.join(CHECKPOINT_DIR, str(ratio_id(keep)))
  ckptr = _checkpointer()
  ckptr.save(_abs(os.path.join(out_dir, rel)), jax.tree.map(np.asarray, dict(variables)),
             force=True)
  ckptr.wait_until_finished()
  return rel


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)  # atomic: an interrupted build never leaves half a library.json


def read_library(library_dir: str) -> dict:
  """The parsed ``library.json`` of a library directory.

  Raises:
    ValueError: no library there, or an unknown format.
  """
  path = os.path.join(library_dir, LIBRARY_FILE)
  if not os.path.exists(path):
    raise ValueError(f"library={library_dir!r}: no {LIBRARY_FILE} there; build one with "
                     "`nemo-jax prune-library MODEL --keep-range 0.2:0.8:0.01 --out DIR`")
  with open(path) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"library={library_dir!r}: {LIBRARY_FILE} is not valid JSON ({e})") from None
  if meta.get("format") != LIBRARY_FORMAT:
    raise ValueError(f"library={library_dir!r}: format={meta.get('format')!r}; allowed: "
                     f"{LIBRARY_FORMAT!r}")
  return meta


def library_ratios(meta: dict) -> tuple[float, ...]:
  """The keep ratios available in a library (sorted, including the dense 1.0)."""
  return tuple(sorted(float(e["keep"]) for e in meta["entries"].values()))


def find_entry(meta: dict, keep: float, library_dir: str = "") -> dict:
  """The entry of ``keep``; ValueError naming the ratio and the available ones if missing."""
  entry = meta["entries"].get(ratio_key(keep))
  if entry is None:
    raise ValueError(f"keep ratio {keep!r} is not in the library {library_dir!r}; available: "
                     f"{list(library_ratios(meta))}")
  return entry


def load_entry(library_dir: str, keep: float, template, meta: dict | None = None):
  """Restores the pruned variables of ratio ``keep``.

  Args:
    library_dir: a directory written by :func:`build_library`.
    keep: one of its keep ratios.
    template: variables (or their ``ShapeDtypeStruct`` tree) of the same model.
    meta: the parsed ``library.json`` (read if None).

  Returns:
    The variables (numpy arrays), same tree as ``template``.
  """
  meta = meta or read_library(library_dir)
  entry = find_entry(meta, keep, library_dir)
  path = _abs(os.path.join(library_dir, entry["checkpoint"]))
  if not os.path.isdir(path):
    raise ValueError(f"library={library_dir!r}: checkpoint {entry['checkpoint']!r} of keep "
                     f"ratio {keep!r} is missing; rebuild it with `nemo-jax prune-library`")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                          if not isinstance(x, jax.ShapeDtypeStruct) else x, dict(template))
  restored = _checkpointer().restore(path, abstract)
  return jax.tree.map(np.asarray, restored)


# --------------------------------------------------------------------------- build


@dataclasses.dataclass
class _Data:
  x_train: np.ndarray
  y_train: np.ndarray
  x_eval: np.ndarray
  y_eval: np.ndarray


def _load_data(dataset, data_dir, eval_split, eval_max_images, train_max_images, seed) -> _Data:
  x_train, y_train = data_lib.load_split(dataset, "train", source_dir=data_dir)
  if train_max_images is not None and train_max_images < len(x_train):
    classes = data_lib.DATASETS[dataset].num_classes
    idx = data_lib.stratified_subset(y_train, max(1, train_max_images // classes), seed=seed)
    x_train, y_train = x_train[idx], y_train[idx]
  x_eval, y_eval = data_lib.load_split(dataset, eval_split, source_dir=data_dir)
  if eval_max_images is not None and eval_max_images < len(x_eval):
    classes = data_lib.DATASETS[dataset].num_classes
    per_class = max(1, min(eval_max_images // classes, int(np.bincount(y_eval).min())))
    idx = data_lib.stratified_subset(y_eval, per_class, seed=seed)
    x_eval, y_eval = x_eval[idx], y_eval[idx]
  return _Data(x_train, y_train, data_lib.preprocess(dataset, x_eval), y_eval)


def _positive(field, v, integer=True, allow_none=False):
  if v is None and allow_none:
    return v
  ok = (isinstance(v, (int, np.integer)) if integer else isinstance(v, (int, float))) \
      and not isinstance(v, bool) and v > 0
  if not ok:
    raise ValueError(f"{field}={v!r} is invalid; allowed: "
                     f"{'a positive integer' if integer else 'a positive number'}"
                     + (" or None" if allow_none else ""))
  return v


def build_library(model, variables, dataset: str, keep_ratios: Sequence[float], out_dir: str,
                  steps: int = 32, epochs_per_step: float = 1.0,
                  steps_per_stage: int | None = None, schedule: str = "independent",
                  batch_size: int = 128, learning_rate: float = 0.01, momentum: float = 0.9,
                  weight_decay: float = 5e-4, augment: bool = True, eval_split: str = "test",
                  eval_max_images: int | None = None, train_max_images: int | None = None,
                  data_dir: str | None = None, seed: int = 0, model_name: str | None = None,
                  checkpoint: str | None = None, progress: bool = True) -> dict:
  """Builds (or resumes) a library of pruned + retrained models, one per keep ratio.

  Args:
    model: a zoo model (``__call__(x, ctx, train)``).
    variables: its trained variables (``params``, ``batch_stats``).
    dataset: dataset name (``data.DATASETS``); retraining uses its ``train`` split.
    keep_ratios: target keep ratios p (fraction of weights KEPT), in (0, 1].
    out_dir: library directory (created; an existing library there is extended).
    steps: pruning steps per ratio (EMOMC: 32).
    epochs_per_step: retraining epochs per step (EMOMC: 1); may be a fraction.
    steps_per_stage: optimizer steps per pruning step; overrides ``epochs_per_step``.
    schedule: ``"independent"`` (EMOMC) or ``"chain"`` (module docstring).
    batch_size, learning_rate, momentum, weight_decay, augment: retraining settings.
    eval_split, eval_max_images: where the accuracy of each pruned model is measured.
    train_max_images: retrain on a stratified subset of this size (None: all).
    data_dir: local source directory of the dataset.
    seed: base PRNG seed (each ratio derives its own from it).
    model_name, checkpoint: recorded in ``library.json`` (stage II checks the model).
    progress: show a progress bar (optimizer steps of the ratios still to build).

  Returns:
    The ``library.json`` content plus ``"built"`` (ratios trained by this call) and
    ``"skipped"`` (ratios found finished).

  Raises:
    ValueError: bad settings (naming the field), or an existing library in ``out_dir``
      built with different settings.
  """
  ratios = check_keep_ratios(keep_ratios)
  _positive("steps", steps)
  _positive("epochs_per_step", epochs_per_step, integer=False)
  _positive("steps_per_stage", steps_per_stage, allow_none=True)
  _positive("batch_size", batch_size)
  _positive("learning_rate", learning_rate, integer=False)
  _positive("eval_max_images", eval_max_images, allow_none=True)
  _positive("train_max_images", train_max_images, allow_none=True)
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r} is invalid; allowed: {SCHEDULES}")
  if dataset not in data_lib.DATASETS:
    raise ValueError(f"dataset={dataset!r} is invalid; allowed: {sorted(data_lib.DATASETS)}")
  if eval_split not in data_lib.DATASETS[dataset].splits:
    raise ValueError(f"eval_split={eval_split!r} is invalid; allowed: "
                     f"{data_lib.DATASETS[dataset].splits}")

  variables = jax.tree.map(jnp.asarray, {"params": variables["params"],
                                         "batch_stats": variables.get("batch_stats", {})})
  info = data_lib.DATASETS[dataset]
  settings = {
      "model": model_name or type(model).__name__,
      "input_shape": list(info.input_shape), "num_classes": info.num_classes,
      "dataset": dataset, "checkpoint": checkpoint, "steps": steps,
      "epochs_per_step": float(epochs_per_step), "steps_per_stage": steps_per_stage,
      "schedule": schedule, "batch_size": batch_size, "learning_rate": float(learning_rate),
      "momentum": float(momentum), "weight_decay": float(weight_decay), "augment": bool(augment),
      "train_max_images": train_max_images, "seed": seed,
      "eval_split": eval_split, "eval_max_images": eval_max_images, "data_dir": data_dir,
  }
  os.makedirs(out_dir, exist_ok=True)
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

  todo = [p for p in ratios if not finished(p)]
  skipped = [p for p in ratios if finished(p)]
  data = _load_data(dataset, data_dir, eval_split, eval_max_images, train_max_images, seed)
  per_epoch = max(1, len(data.x_train) // batch_size)
  stage_steps = steps_per_stage or max(1, int(round(epochs_per_step * per_epoch)))

  def record(p, v, seconds, start_keep):
    top1 = train_lib.float_accuracy(model, v, data.x_eval, data.y_eval)
    counts = nonzero_counts(v["params"])
    rel = save_entry(out_dir, p, v)
    meta["entries"][ratio_key(p)] = {
        "keep": p, "id": ratio_id(p), "checkpoint": rel, "top1": top1,
        "nonzero": int(sum(c[0] for c in counts.values())),
        "weights": int(sum(c[1] for c in counts.values())),
        "start_keep": start_keep, "seconds": round(seconds, 3)}
    _write_json(lib_path, meta)

  if not finished(DENSE_KEEP):
    record(DENSE_KEEP, variables, 0.0, DENSE_KEEP)

  tx = _optimizer(learning_rate, momentum, weight_decay)
  step_fn = _make_masked_step(model, tx)
  bar = tqdm(total=len(todo) * steps * stage_steps, disable=not progress, desc="prune-library",
             unit="step")
  built = []
  for p in sorted(todo, reverse=True):  # descending: "chain" needs the denser ones first
    if p == DENSE_KEEP:
      built.append(p)
      continue
    t0 = time.perf_counter()
    start_keep, start = DENSE_KEEP, variables
    if schedule == "chain":
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
      keep_k = p if k == steps else start_keep * (p / start_keep) ** (k / steps)
      # Magnitudes of the current (already pruned) weights: masks only ever shrink.
      masks = magnitude_masks(params, keep_k)
      params = jax.tree.map(lambda w, m: (w * m).astype(w.dtype), params, masks)
      done = 0
      while done < stage_steps:
        for xb, yb in data_lib.iterate_batches(data.x_train, data.y_train, batch_size,
                                               int(rng.integers(2**31)), shuffle=True,
                                               drop_last=len(data.x_train) >= batch_size):
          if augment and data_lib.DATASETS[dataset].crop_padding:
            xb = data_lib.augment(dataset, xb, int(rng.integers(2**31)))
          xb = data_lib.preprocess(dataset, xb)
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
  bar.close()
  return {**meta, "built": sorted(built), "skipped": skipped}


def library_table(meta: dict) -> str:
  """Text table of a library: keep ratio, non-zero weights and accuracy per entry."""
  s = meta["settings"]
  lines = [f"library of {s['model']} on {s['dataset']} ({s['schedule']}, {s['steps']} steps; "
           f"top-1 on {s['eval_split']})",
           f"{'keep':>7} {'nonzero':>10} {'weights':>10} {'top1':>7} {'seconds':>8}"]
  for key in sorted(meta["entries"], key=float):
    e = meta["entries"][key]
    lines.append(f"{e['keep']:>7.4f} {e['nonzero']:>10d} {e['weights']:>10d} "
                 f"{100 * e['top1']:>6.2f}% {e['seconds']:>8.1f}")
  return "\n".join(lines)


def build_library_for(model_name: str = "resnet20", checkpoint: str = "default",
                      dataset: str = "fashion_mnist_embedded", out_dir: str = "runs/library",
                      keep_ratios: Sequence[float] = (0.5,), input_shape=None,
                      num_classes=None, **kwargs) -> dict:
  """:func:`build_library` for a zoo model name and checkpoint (``"default"`` or a path)."""
  from nemo_jax._src import checkpoint as ckpt
  from nemo_jax._src import models as models_lib
  info = data_lib.DATASETS.get(dataset)
  if info is None:
    raise ValueError(f"dataset={dataset!r} is invalid; allowed: {sorted(data_lib.DATASETS)}")
  shape = tuple(input_shape or info.input_shape)
  classes = num_classes or info.num_classes
  if checkpoint == "default":
    if model_name != models_lib.DEFAULT_MODEL or shape != tuple(models_lib.DEFAULT_INPUT_SHAPE):
      raise ValueError(f"checkpoint='default' is the {models_lib.DEFAULT_MODEL} "
                       f"{models_lib.DEFAULT_INPUT_SHAPE} model; for model={model_name!r} "
                       "give --checkpoint PATH")
    model, variables = train_lib.load_default_model()
  else:
    if model_name not in models_lib.list_models():
      raise ValueError(f"model={model_name!r} is invalid; allowed: {models_lib.list_models()}")
    if not os.path.exists(checkpoint):
      raise ValueError(f"checkpoint={checkpoint!r}: no such file; give 'default' or a "
                       "variables file written by `nemo-jax train` / `nemo-jax convert`")
    model = models_lib.get_model(model_name, input_shape=shape, num_classes=classes)
    variables = ckpt.load_variables(checkpoint, model, shape)
  return build_library(model, variables, dataset, keep_ratios, out_dir, model_name=model_name,
                       checkpoint=checkpoint, **kwargs)
