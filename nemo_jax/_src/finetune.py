"""Quantization-aware fine-tuning of chosen front members of a search run.

``finetune_members(run_dir, members)`` rebuilds each member ``K`` of ``front.json``
(``run.members.load_run_member``), trains its float variables with optax through the
member's fake-quantized forward pass (fixed bits, fixed pruning mask, the run's
calibrated activation ranges; the quantizers' straight-through estimators carry the
gradients), BatchNorm statistics updated in train mode, and writes

* ``RUN_DIR/finetune/K/``: an orbax checkpoint per epoch (a re-run resumes; a finished
  member is skipped) and the fine-tuned ``variables.msgpack``;
* ``RUN_DIR/finetuned.json``: per member, loss / top-1 before and after on the training
  images used, the run's fitness images, its selection images (``selection``: held out
  of the training images) and its final-phase split (``final``: the test set), and the
  member's cost objectives (unchanged: the bits do not change);
* ``RUN_DIR/front_finetuned.png``: the front with the fine-tuned points beside the PTQ
  ones.

(``docs/DESIGN.md``, "Fine-tuning".)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from nemo_jax._src import checkpoint as ckpt
from nemo_jax._src import data as data_lib
from nemo_jax._src import faults
from nemo_jax._src import quant
from nemo_jax._src import schemes as schemes_lib
from nemo_jax._src import validate as v
from nemo_jax._src.layers import QContext
from nemo_jax._src.models import trace_quantizers
from nemo_jax._src.problem import fitness_data, image_sets, split_arrays
from nemo_jax._src.run import checkpoint as ckpt_lib
from nemo_jax._src.run import final as final_lib
from nemo_jax._src.run import report
from nemo_jax._src.run.config import SearchConfig
from nemo_jax._src.run.members import load_run_member
from nemo_jax._src.run.rundir import CONFIG_FILE, FRONT_FILE, RunDir
from nemo_jax._src.schemes import kernel_paths
from nemo_jax._src.train import cross_entropy

FINETUNE_DIR = "finetune"
FINETUNED_FILE = "finetuned.json"
FINETUNED_PLOT = "front_finetuned.png"
VARIABLES_FILE = "variables.msgpack"
SETTINGS_FILE = "settings.json"
OPTIMIZERS = ("adam", "sgd")
RESUME_OVERRIDES = ("epochs",)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Fine-tuning hyper-parameters.

  Attributes:
    epochs: passes over the training images.
    batch_size: training batch size (the last partial batch is dropped).
    learning_rate: constant learning rate (small: the weights start trained).
    optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
    momentum: SGD momentum.
    train_split: the dataset split trained on (without the run's selection images
      when it is the run's ``eval_split``; never the run's ``final_split``).
    max_images: a stratified subset of that many training images (None: all).
    eval_batch_size: batch size of the loss / accuracy passes.
    seed: shuffling seed.
  """
  epochs: int = 1
  batch_size: int = 64
  learning_rate: float = 1e-4
  optimizer: str = "adam"
  momentum: float = 0.9
  train_split: str = "train"
  max_images: int | None = None
  eval_batch_size: int = 500
  seed: int = 0

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "FinetuneConfig":
    """Validates a mapping of fields (unknown keys and bad values name the field)."""
    cfg = v.dataclass_from(cls, "finetune config", d)
    for name in ("epochs", "batch_size", "eval_batch_size"):
      v.integer(name, getattr(cfg, name), 1)
    if cfg.max_images is not None:
      v.integer("max_images", cfg.max_images, 1)
    v.number("learning_rate", cfg.learning_rate, 0.0, open_lo=True)
    v.number("momentum", cfg.momentum, 0.0, 1.0)
    v.choice("optimizer", cfg.optimizer, OPTIMIZERS)
    v.seed("seed", cfg.seed)
    return cfg


def make_optimizer(cfg: FinetuneConfig) -> optax.GradientTransformation:
  """Adam or SGD with momentum at the constant ``cfg.learning_rate``."""
  if cfg.optimizer == "adam":
    return optax.adam(cfg.learning_rate)
  return optax.sgd(cfg.learning_rate, momentum=cfg.momentum)


def member_start(problem, config):
  """``(variables, masks, apply)`` of one member: the float variables with the member's
  pruned kernels, the kernels' keep masks and ``apply(variables, x, train)`` running the
  member's fake-quantized forward pass (train: ``(logits, {"batch_stats": ...})``).

  At the start, ``apply(variables, x, False)`` is the evaluator's forward pass of the
  member (``evaluator.member_apply_fn``); the kernels are masked every call, so pruned
  weights stay zero.
  """
  scheme, source = problem.scheme, problem.source
  spec = scheme.spec
  if scheme.name != "ptq":
    raise ValueError(f"scheme: {scheme.name!r}; allowed: 'ptq' (fine-tuning a library "
                     "run's pruned entries is not supported)")
  model = source.model
  prepared = scheme.prepare(model, source.variables, source.input_shape)
  layers, _ = trace_quantizers(model, source.input_shape, scheme.variables_template(prepared),
                               spec.placement)
  variables, kernels = jax.jit(scheme.member_pruned)(prepared, config)
  variables = jax.tree.map(jnp.asarray, variables)
  for path, k in zip(kernel_paths(layers), kernels):
    node = variables
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = k
  masks = [k != 0 for k in kernels]
  if scheme.member_outputs is not None:
    raise ValueError(f"calibration={spec.calibration!r}: bias correction is not "
                     "fine-tuned; allowed: a run without bias correction")
  quantizers = scheme.member_quantizers(prepared, config)
  quantize_input = schemes_lib.member_inputs(scheme, prepared, config, quantizers)
  w_bits, mode = config.w_bits, spec.weight_quant

  def apply(vars_, x, train: bool):
    def quantize_kernel(kernel, i):
      return quant.quantize_weight(kernel * masks[i], w_bits[i], mode,
                                   **quantizers.weight_kwargs[i])
    ctx = QContext(quantize_input=quantize_input, placement=spec.placement,
                   quantize_kernel=quantize_kernel)
    if train:
      return model.apply(vars_, x, ctx, train=True, mutable=["batch_stats"])
    return model.apply(vars_, x, ctx, train=False)

  return variables, masks, apply, layers


def _masked(variables, masks, layers):
  """The variables with every kernel times its mask (what is saved and exported)."""
  out = jax.tree.map(lambda x: x, variables)
  for path, m in zip(kernel_paths(layers), masks):
    node = out
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = node[path[-1]] * m
  return out


def scores(apply, variables, images, labels, batch_size: int) -> dict:
  """Mean cross-entropy, top-1 and top-5 (fractions) of the member on ``images``."""
  fn = jax.jit(lambda vs, x: apply(vs, x, False))
  loss = top1 = top5 = 0.0
  for s in range(0, len(images), batch_size):
    logits = fn(variables, jnp.asarray(images[s:s + batch_size]))
    y = jnp.asarray(labels[s:s + batch_size])
    loss += float(cross_entropy(logits, y)) * len(y)
    top1 += int(jnp.sum(jnp.argmax(logits, -1) == y))
    k = min(5, logits.shape[-1])
    top5 += int(jnp.sum(jnp.any(jax.lax.top_k(logits, k)[1] == y[:, None], -1)))
  n = len(images)
  return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n}


def train_indices(search_cfg: SearchConfig, cfg: FinetuneConfig, labels,
                  held_out: tuple[int, int] | None = None) -> np.ndarray:
  """Indices of the training images among ``cfg.train_split``'s labels ``[N]``.

  When ``train_split`` is the run's ``eval_split``, the images the checkpoint was not
  trained on (``held_out``, from its metadata) are left out, or without that metadata the
  run's selection images (they stay held out for the before / after comparison;
  ``docs/DESIGN.md``, "Image sets"); then a stratified ``max_images`` subset of the
  rest, if asked for.

  Raises:
    ValueError: ``train_split`` is the run's ``final_split`` (the test set is only
      reported, never trained on).
  """
  problem_cfg = search_cfg.problem
  if cfg.train_split == search_cfg.run.final_split:
    raise ValueError(f"train_split={cfg.train_split!r} is the run's final_split (the test "
                     "set, only reported); allowed: another split, e.g. the run's "
                     f"eval_split {problem_cfg.eval_split!r}")
  labels = np.asarray(labels)
  idx = np.arange(len(labels))
  if cfg.train_split == problem_cfg.eval_split:
    if held_out is not None:   # every image the checkpoint was not trained on stays out
      idx = data_lib.held_out_split(labels, *held_out)[0]
    else:
      sets = image_sets(problem_cfg, labels, search_cfg.image_seed,
                        search_cfg.run.selection_per_class)
      idx = np.setdiff1d(idx, sets["selection"])
  if cfg.max_images is not None and cfg.max_images < len(idx):
    idx = idx[data_lib.capped_stratified_subset(labels[idx], cfg.max_images, cfg.seed)]
  return idx


def _train_data(problem, search_cfg: SearchConfig, cfg: FinetuneConfig):
  images, labels = split_arrays(problem.cfg, cfg.train_split, problem.data)
  idx = train_indices(search_cfg, cfg, labels, problem.held_out)
  images, labels = images[idx], labels[idx]
  if len(images) < cfg.batch_size:
    raise ValueError(f"batch_size={cfg.batch_size} exceeds the {len(images)} training "
                     "images; allowed: at most the number of training images")
  return np.asarray(images, np.float32), np.asarray(labels, np.int32)


def _read_finetuned(run_dir: str) -> dict:
  path = os.path.join(run_dir, FINETUNED_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return {int(e["member"]): e for e in json.load(f)}
  except (OSError, ValueError, TypeError, KeyError) as e:
    raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e}); allowed: the file "
                     "`nemo-jax finetune` wrote (move it away to start over)") from None


def _write_finetuned(run_dir: str, entries: dict) -> None:
  faults.write_json(os.path.join(run_dir, FINETUNED_FILE), [entries[k] for k in sorted(entries)])


def finetune_member(run_dir: str, member: int, cfg: FinetuneConfig, stop=None,
                    progress: bool = True, loaded=None) -> dict:
  """Fine-tunes one front member (module docstring); resumes its checkpoint.

  Args:
    run_dir: a finished ``nemo-jax search`` directory.
    member: index into its ``front.json``.
    cfg: the hyper-parameters.
    stop: a ``faults.GracefulStop`` checked after every step (None: never stops).
    progress: show a tqdm bar.
    loaded: ``run.members.load_run_member(run_dir, member)`` if already computed.

  Returns:
    The member's ``finetuned.json`` entry.
  """
  problem, config, entry = loaded or load_run_member(run_dir, member)
  search_cfg = RunDir(run_dir).read_config()
  variables, masks, apply, layers = member_start(problem, config)
  x_train, y_train = _train_data(problem, search_cfg, cfg)
  directory = os.path.join(run_dir, FINETUNE_DIR, str(member))
  faults.probe_writable(directory, what="run_dir")
  tx = make_optimizer(cfg)
  state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
           "opt_state": tx.init(variables["params"])}
  meta = {"config": dataclasses.asdict(cfg), "epoch_loss": []}
  manager = ckpt_lib.checkpoint_manager(directory)
  if manager.all_steps():
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

    def restore(step):
      r = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      if len(r["meta"]["epoch_loss"]) != step:
        raise ValueError(f"step {step} does not hold {step} epochs")
      return r

    start, restored, _ = ckpt_lib.restore_newest_good(manager.all_steps(), restore, directory)
    ckpt_lib.check_resume_settings(dataclasses.asdict(cfg), restored["meta"]["config"],
                                 RESUME_OVERRIDES, directory,
                                 "remove that directory to start over")
    state, meta = restored["state"], dict(restored["meta"])
    meta["config"] = dataclasses.asdict(cfg)
  else:
    start = 0
  faults.write_json(os.path.join(directory, SETTINGS_FILE), dataclasses.asdict(cfg))
  before_vars = _masked({"params": variables["params"],
                         "batch_stats": variables["batch_stats"]}, masks, layers)

  @jax.jit
  def step(state, x, y):
    def loss_fn(p):
      logits, updates = apply({"params": p, "batch_stats": state["batch_stats"]}, x, True)
      return cross_entropy(logits, y), updates["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
            "opt_state": opt_state}, loss

  steps_per_epoch = len(x_train) // cfg.batch_size
  bar = tqdm(total=(cfg.epochs - min(start, cfg.epochs)) * steps_per_epoch,
             disable=not progress, desc=f"finetune member {member}")
  for epoch in range(start, cfg.epochs):
    losses = []
    for xb, yb in data_lib.iterate_batches(x_train, y_train, cfg.batch_size,
                                           cfg.seed + epoch, shuffle=True, drop_last=True):
      state, loss = step(state, jnp.asarray(xb), jnp.asarray(yb))
      losses.append(float(loss))
      bar.update(1)
      if stop is not None:
        stop.check()   # mid-epoch: the previous epoch's checkpoint is what resumes
    meta["epoch_loss"] = list(meta["epoch_loss"]) + [float(np.mean(losses))]
    bar.set_postfix(epoch=epoch + 1, loss=f"{meta['epoch_loss'][-1]:.3f}")
    ckpt_lib.save_step(manager, epoch + 1, ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    if stop is not None:
      stop.check()
  bar.close()
  after_vars = _masked({"params": state["params"], "batch_stats": state["batch_stats"]},
                       masks, layers)
  faults.check_finite(after_vars, f"fine-tuned member {member}")
  out_vars = os.path.join(directory, VARIABLES_FILE)
  ckpt.save_variables(out_vars, jax.device_get(after_vars))

  evals = {"train": (x_train, y_train)}
  x_fit, y_fit, _ = fitness_data(problem.cfg, search_cfg.image_seed,
                                 search_cfg.run.selection_per_class, problem.data,
                                 problem.held_out)
  evals["fitness"] = (x_fit, y_fit)
  # The held-out sets: selection (eval_split images never trained on) and test.
  held_out = final_lib.report_sets(problem, search_cfg)
  for name, key in (("selection", "selection_top1"), ("final", "final_top1")):
    if key in held_out:
      evals[name] = final_lib.materialise(held_out[key])
  result = {"member": int(member), "w_bits": list(entry.w_bits), "a_bits": list(entry.a_bits),
            "keep": entry.keep, "species": entry.species,
            "objectives": dict(entry.objectives), "epochs": cfg.epochs,
            "epoch_loss": meta["epoch_loss"], "config": dataclasses.asdict(cfg),
            "train_images": int(len(x_train)), "variables": out_vars}
  for name, (x, y) in evals.items():
    b = scores(apply, before_vars, x, y, cfg.eval_batch_size)
    a = scores(apply, after_vars, x, y, cfg.eval_batch_size)
    result[name] = {"images": int(len(x)), "before": b, "after": a}
  # The accuracy objectives as the fine-tuned member scores them (fitness images).
  result["objectives_finetuned"] = {
      k: (1.0 - result["fitness"]["after"]["top1"] if k == "top1_error" else
          1.0 - result["fitness"]["after"]["top5"] if k == "top5_error" else val)
      for k, val in entry.objectives.items()}
  return result


def parse_members(text: str) -> list[int]:
  """``"0,3,5"`` -> ``[0, 3, 5]`` (the CLI's ``--members``)."""
  try:
    members = [int(p) for p in str(text).split(",")]
  except ValueError:
    raise ValueError(f"--members {text!r}: expected comma-separated integers, e.g. 0,3"
                     ) from None
  if len(set(members)) != len(members):
    raise ValueError(f"--members {text!r}: a member is named twice; allowed: distinct indices")
  return members


def finetune_members(run_dir: str, members: Sequence[int], epochs: int | None = None,
                     config: Mapping[str, Any] | FinetuneConfig | None = None,
                     progress: bool = True) -> list[dict]:
  """Quantization-aware fine-tuning of front members ``members`` of a search run.

  Args:
    run_dir: a finished ``nemo-jax search`` directory.
    members: indices into its ``front.json``.
    epochs: epochs per member (overrides ``config``'s).
    config: :class:`FinetuneConfig` fields (a mapping or the dataclass). A member
      fine-tuned before keeps its saved settings for every field not given here (so a
      re-run continues it; ``epochs`` may grow); otherwise the defaults apply.
    progress: show progress bars.

  Returns:
    The ``finetuned.json`` entries of ``members`` (module docstring). A member whose
    entry already holds ``epochs`` epochs of the same settings is skipped (returned as
    saved).

  Raises:
    ValueError: a bad run directory, member index or setting.
    faults.StopRequested: a stop signal; the finished epochs are checkpointed.
  """
  if isinstance(config, FinetuneConfig):
    config = dataclasses.asdict(config)
  asked = {k: x for k, x in (config or {}).items() if x is not None}
  if epochs is not None:
    asked["epochs"] = epochs
  FinetuneConfig.from_dict(asked)   # bad settings fail before any work
  members = list(members)
  if not members:
    raise ValueError("members: empty; allowed: at least one front index")
  run = RunDir(run_dir)
  run.require(CONFIG_FILE, FRONT_FILE)
  # One writer per run directory (a search resuming there, another fine-tuning); it
  # takes files before any work.
  with run.lock("nemo-jax finetune", what="run_dir", create=False):
    faults.probe_writable(run_dir, what="run_dir")
    return _finetune_members(run_dir, members, asked, progress)


def _finetune_members(run_dir: str, members: list[int], asked: dict,
                      progress: bool) -> list[dict]:
  """:func:`finetune_members` in its locked run directory."""
  # Every index is checked before any training (the first load checks the directory).
  first = load_run_member(run_dir, members[0], progress=False)
  loaded = {members[0]: first}
  for k in members[1:]:
    if k in loaded:
      raise ValueError(f"members: {k} is named twice; allowed: distinct indices")
    loaded[k] = load_run_member(run_dir, k, problem=first[0])
  entries = _read_finetuned(run_dir)
  out = []
  hint = f"run `nemo-jax finetune {run_dir} --members {','.join(map(str, members))}` again"
  with faults.GracefulStop(hint) as stop:
    for k in members:
      cfg = FinetuneConfig.from_dict({**_saved_settings(run_dir, k), **asked})
      saved = entries.get(int(k))
      if saved is not None and saved.get("config") == dataclasses.asdict(cfg):
        if progress:
          tqdm.write(f"finetune: member {k} already fine-tuned ({cfg.epochs} epochs); skipped", file=sys.stderr)
        out.append(saved)
        continue
      entries[int(k)] = finetune_member(run_dir, k, cfg, stop, progress, loaded[k])
      _write_finetuned(run_dir, entries)
      out.append(entries[int(k)])
  plot_finetuned(run_dir)
  return out


def _saved_settings(run_dir: str, member: int) -> dict:
  path = os.path.join(run_dir, FINETUNE_DIR, str(member), SETTINGS_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e}); allowed: the file "
                     "`nemo-jax finetune` wrote") from None
  if not isinstance(saved, dict):
    raise ValueError(f"{path}: expected an object of settings, got {type(saved).__name__}")
  return saved


def plot_finetuned(run_dir: str) -> str | None:
  """Redraws ``front_finetuned.png``: the front and the fine-tuned members beside it."""
  entries = _read_finetuned(run_dir)
  if not entries:
    return None
  run = RunDir(run_dir)
  front = [m.to_dict() for m in run.read_front()]
  objectives = run.read_config().problem.objectives
  tuned = [{"objectives": e["objectives_finetuned"], "member": k}
           for k, e in sorted(entries.items())]
  return report.plot_front(run_dir, front, objectives, finetuned=tuned,
                           filename=FINETUNED_PLOT)
