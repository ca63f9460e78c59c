"""Saving and strictly loading model variables (a single msgpack file).

Model checkpoints are small single files (flax.serialization msgpack) so the default one
can ship inside the package; search state uses orbax (see ``search/run.py``).
Loading is strict: every leaf must exist in the model's own variable tree with the same
shape, and the error names everything that did not match.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.serialization
import jax.numpy as jnp
import numpy as np

from nemo_jax._src import models
from nemo_jax._src.faults import check_finite, write_atomic

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
DEFAULT_CHECKPOINT = os.path.join(ASSETS, "resnet20_fashion_mnist.msgpack")
DEFAULT_CHECKPOINT_INFO = os.path.join(ASSETS, "resnet20_fashion_mnist.json")

SEP = "/"


def flatten_dict(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Nested dict -> ``{path tuple: leaf}``."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_dict(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def unflatten_dict(flat: Mapping[tuple[str, ...], Any]) -> dict:
  """``{path tuple: leaf}`` -> nested dict."""
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def save_variables(path: str | os.PathLike, variables: Mapping) -> None:
  """Writes variables (nested dicts of arrays) as msgpack, atomically."""
  plain = unflatten_dict({p: np.asarray(v) for p, v in flatten_dict(variables).items()})
  data = flax.serialization.msgpack_serialize(plain)
  write_atomic(path, lambda f: f.write(data))


def load_variables(path: str | os.PathLike, model, input_shape, strict: bool = True) -> dict:
  """Reads variables saved by :func:`save_variables` and checks them against ``model``.

  Args:
    path: msgpack file.
    model: the Flax module they belong to.
    input_shape: ``(H, W, C)`` used to derive the expected shapes.
    strict: if True, entries the model does not have are an error; if False they are
      dropped. Missing entries and shape mismatches are always errors.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of jax arrays, as ``model.init`` makes.

  Raises:
    ValueError: unreadable file, (listing all) missing / unexpected / mis-shaped leaves,
      or a leaf holding NaN/inf (named).
  """
  try:
    with open(path, "rb") as f:
      restored = flax.serialization.msgpack_restore(f.read())
  except OSError as e:
    raise ValueError(f"variables file {path}: cannot be read ({e.strerror})") from None
  except Exception as e:  # msgpack decoding errors
    raise ValueError(f"variables file {path}: not a msgpack variables file "
                     f"({type(e).__name__}: {e})") from None
  if not isinstance(restored, Mapping):
    raise ValueError(f"variables file {path}: expected a dict of collections")
  expected = flatten_dict(models.abstract_variables(model, input_shape))
  found = flatten_dict(restored)
  missing = [SEP.join(p) for p in expected if p not in found]
  unexpected = [SEP.join(p) for p in found if p not in expected]
  mismatched = [f"{SEP.join(p)}: file {tuple(np.shape(found[p]))}, model "
                f"{tuple(s.shape)}" for p, s in expected.items()
                if p in found and tuple(np.shape(found[p])) != tuple(s.shape)]
  if missing or mismatched or (strict and unexpected):
    parts = []
    if missing:
      parts.append(f"missing: {missing}")
    if mismatched:
      parts.append(f"shape mismatches: {mismatched}")
    if strict and unexpected:
      parts.append(f"unexpected: {unexpected}")
    raise ValueError(f"variables file {path} does not match the model: " + "; ".join(parts))
  out = unflatten_dict({p: jnp.asarray(found[p], s.dtype) for p, s in expected.items()})
  check_finite(out, f"variables file {path}")
  return out


def load_default_model():
  """The shipped default model: ``(model, variables)`` (resnet20 on Fashion-MNIST).

  Made by ``experiments/configs/train_default.py``; its training config and metrics are
  in ``nemo_jax/assets/resnet20_fashion_mnist.json``.
  """
  with open(DEFAULT_CHECKPOINT_INFO) as f:
    info = json.load(f)["config"]
  shape, classes = models.DEFAULT_INPUT_SHAPE, models.DEFAULT_NUM_CLASSES
  model = models.get_model(info["model"], input_shape=shape, num_classes=classes)
  return model, load_variables(DEFAULT_CHECKPOINT, model, shape)


def load_model(name: str, checkpoint: str, input_shape, num_classes: int,
               registry: models.ModelRegistry | None = None):
  """A registered model and its variables: the one loader of searches, libraries, exports.

  Args:
    name: registered model name (the zoo, or ``registry``).
    checkpoint: ``"default"`` (the shipped model, only for its own name, shape and
      classes) or a variables file written by ``nemo-jax convert`` / ``nemo-jax train``.
    input_shape: ``(H, W, C)``.
    num_classes: logits.
    registry: where ``name`` is looked up (default: the zoo).

  Returns:
    ``(model, variables)``.

  Raises:
    ValueError: unknown model, a missing file, or a checkpoint that does not match (its
      model, input shape or number of classes).
  """
  models.check_model_name(name, registry=registry)
  shape = tuple(input_shape)
  if checkpoint == "default":
    default = (models.DEFAULT_MODEL, tuple(models.DEFAULT_INPUT_SHAPE),
               models.DEFAULT_NUM_CLASSES)
    if (name, shape, num_classes) != default:
      raise ValueError(f"checkpoint='default' is the {default[0]} {default[1]} model with "
                       f"{default[2]} classes; for model={name!r} input_shape={shape} "
                       f"num_classes={num_classes} give a checkpoint path")
    return load_default_model()
  if not os.path.exists(checkpoint):
    raise ValueError(f"checkpoint={checkpoint!r}: no such file; give 'default' or a "
                     "variables file written by `nemo-jax convert` / `nemo-jax train`")
  model = models.get_model(name, input_shape=shape, num_classes=num_classes, registry=registry)
  return model, load_variables(checkpoint, model, shape)


def training_images(checkpoint: str) -> dict | None:
  """What a ``nemo-jax train`` checkpoint was trained on, from its sidecar's training
  config: ``{"dataset", "split", "held_out_per_class", "held_out_seed"}`` (the split is
  ``"train"`` minus ``held_out_per_class`` images per class, ``data.held_out_split``),
  or None for a checkpoint without such a sidecar (converted, or written elsewhere)."""
  path = DEFAULT_CHECKPOINT_INFO if checkpoint == "default" else \
      os.path.splitext(os.fspath(checkpoint))[0] + ".json"
  try:
    with open(path) as f:
      config = json.load(f).get("config")
  except (OSError, ValueError, AttributeError):
    return None
  if not isinstance(config, Mapping) or "epochs" not in config:
    return None
  return {"dataset": config.get("dataset"), "split": "train",
          "held_out_per_class": int(config.get("held_out_per_class", 0)),
          "held_out_seed": int(config.get("held_out_seed", 0))}
