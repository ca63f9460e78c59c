"""Float training of zoo models with optax (and the shipped default model).

``train(config)`` trains a model from scratch on a local dataset and returns its
variables and metrics. The default checkpoint in ``nemo_jax/assets`` was produced by
``experiments/configs/train_default.py``; :func:`load_default_model` returns it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from nemo_jax._src import checkpoint as ckpt
from nemo_jax._src import data as data_lib
from nemo_jax._src import models as models_lib
from nemo_jax._src import validate as v
from nemo_jax._src.faults import write_json



@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Float training hyper-parameters (``experiments/configs/train_default.py``).

  ``held_out_per_class`` training images per class (drawn with ``held_out_seed``,
  ``data.held_out_split``) are left out of training and recorded in the checkpoint's
  metadata: searches on the checkpoint draw their selection images from them only.
  """
  model: str = models_lib.DEFAULT_MODEL
  dataset: str = "fashion_mnist_embedded"
  data_dir: str | None = None
  held_out_per_class: int = 0
  held_out_seed: int = 0
  epochs: int = 20
  batch_size: int = 128
  learning_rate: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  label_smoothing: float = 0.0
  augment: bool = True
  seed: int = 0
  eval_batch_size: int = 500

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
    """Validates a mapping of fields (unknown keys and bad values name the field)."""
    cfg = v.dataclass_from(cls, "train config", d)
    models_lib.check_model_name(cfg.model)
    v.choice("dataset", cfg.dataset, sorted(data_lib.DATASETS))
    for name in ("epochs", "batch_size", "eval_batch_size"):
      v.integer(name, getattr(cfg, name), 1)
    v.number("learning_rate", cfg.learning_rate, 0.0, open_lo=True)
    v.number("momentum", cfg.momentum, 0.0, 1.0)
    v.number("weight_decay", cfg.weight_decay, 0.0)
    v.number("label_smoothing", cfg.label_smoothing, 0.0, 1.0)
    v.boolean("augment", cfg.augment)
    v.integer("held_out_per_class", cfg.held_out_per_class, 0)
    v.integer("held_out_seed", cfg.held_out_seed, 0)
    v.seed("seed", cfg.seed)
    return cfg


def cross_entropy(logits, labels, label_smoothing=0.0):
  one_hot = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing) \
      if label_smoothing else jax.nn.one_hot(labels, logits.shape[-1])
  return optax.softmax_cross_entropy(logits, one_hot).mean()


def make_optimizer(cfg: TrainConfig, steps: int) -> optax.GradientTransformation:
  schedule = optax.cosine_decay_schedule(cfg.learning_rate, steps)
  # Weight decay on kernels only (not BN scales/biases), as is standard for ResNets.
  mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=mask),
                     optax.sgd(schedule, momentum=cfg.momentum, nesterov=True))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, label_smoothing=0.0):
  """A jitted SGD step: ``(params, batch_stats, opt_state, x, y) -> (...new, loss)``."""

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, None,
                                    train=True, mutable=["batch_stats"])
      return cross_entropy(logits, y, label_smoothing), updates["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return step


def float_accuracy(model: nn.Module, variables, images, labels, batch_size=500) -> float:
  """Top-1 accuracy (fraction) of the float model on preprocessed ``images``."""
  predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, None, train=False), -1))
  correct = 0
  for s in range(0, len(images), batch_size):
    pred = predict(variables, jnp.asarray(images[s:s + batch_size]))
    correct += int(np.sum(np.asarray(pred) == labels[s:s + batch_size]))
  return correct / len(images)


def train(cfg: TrainConfig, progress: bool = True):
  """Trains ``cfg.model`` on ``cfg.dataset`` from scratch.

  Returns:
    ``(model, variables, metrics)``; metrics has ``test_top1``, ``train_seconds``,
    ``final_loss`` and ``epochs``.
  """
  info = data_lib.DATASETS[cfg.dataset]
  x_train, y_train = data_lib.load_split(cfg.dataset, "train", source_dir=cfg.data_dir)
  x_test, y_test = data_lib.load_split(cfg.dataset, "test", source_dir=cfg.data_dir)
  train_idx, held_idx = data_lib.held_out_split(y_train, cfg.held_out_per_class,
                                                cfg.held_out_seed)
  x_held, y_held = x_train[held_idx], y_train[held_idx]
  x_train, y_train = x_train[train_idx], y_train[train_idx]
  input_shape = tuple(x_train.shape[1:])
  model = models_lib.get_model(cfg.model, input_shape=input_shape,
                               num_classes=info.num_classes)
  key = jax.random.key(cfg.seed)
  variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32))
  params, batch_stats = variables["params"], variables["batch_stats"]
  steps_per_epoch = len(x_train) // cfg.batch_size
  tx = make_optimizer(cfg, cfg.epochs * steps_per_epoch)
  opt_state = tx.init(params)
  step = make_train_step(model, tx, cfg.label_smoothing)
  rng = np.random.default_rng(cfg.seed)
  t0 = time.perf_counter()
  loss = float("nan")
  bar = tqdm(total=cfg.epochs * steps_per_epoch, disable=not progress, desc="train")
  for epoch in range(cfg.epochs):
    for xb, yb in data_lib.iterate_batches(x_train, y_train, cfg.batch_size,
                                           int(rng.integers(2**31)), shuffle=True,
                                           drop_last=True):
      if cfg.augment:
        xb = data_lib.augment(cfg.dataset, xb, int(rng.integers(2**31)))
      xb = data_lib.preprocess(cfg.dataset, xb)
      params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state,
                                                  jnp.asarray(xb), jnp.asarray(yb))
      bar.update(1)
    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.3f}")
  bar.close()
  train_seconds = time.perf_counter() - t0
  variables = {"params": params, "batch_stats": batch_stats}
  top1 = float_accuracy(model, variables, data_lib.preprocess(cfg.dataset, x_test), y_test,
                        cfg.eval_batch_size)
  metrics = {"test_top1": top1, "train_seconds": train_seconds, "final_loss": float(loss),
             "epochs": cfg.epochs, "train_images": int(len(x_train)),
             "test_images": int(len(x_test))}
  if len(x_held):
    metrics["held_out_images"] = int(len(x_held))
    metrics["held_out_top1"] = float_accuracy(
        model, variables, data_lib.preprocess(cfg.dataset, x_held), y_held, cfg.eval_batch_size)
  return model, variables, metrics


def save_trained(path: str, cfg: TrainConfig, variables, metrics) -> None:
  """Writes the checkpoint and a JSON sidecar (config + metrics + versions, and the
  ``checkpoint`` metadata that loading checks against a config: model, input shape,
  classes, dataset, training split)."""
  spec = data_lib.DATASETS[cfg.dataset]
  ckpt.save_variables(path, variables)
  info = {"config": dataclasses.asdict(cfg), "metrics": metrics,
          "checkpoint": ckpt.checkpoint_metadata(cfg.model, spec.input_shape,
                                                 spec.num_classes, cfg.dataset, "train"),
          "versions": {"jax": jax.__version__}}
  write_json(ckpt.sidecar_path(path), info, indent=2)
