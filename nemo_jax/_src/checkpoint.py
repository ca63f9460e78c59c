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

from nemo_jax._src import data as data_lib
from nemo_jax._src import models
from nemo_jax._src.faults import check_finite, write_atomic

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
DEFAULT_CHECKPOINTS = {
    "resnet20": "resnet20_fashion_mnist.msgpack",
    "mobilenet_v2_small": "mobilenet_v2_small_fashion_mnist.msgpack",
}
"""The shipped checkpoint of each zoo model that has one (``checkpoint="default"``): all
trained on the embedded Fashion-MNIST subset minus its held-out images
(``experiments/configs/train_*.py``; training config and metrics in the ``.json`` beside
each)."""

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
  """Writes variables (nested dicts of arrays) as msgpack, atomically (its directory is
  created if needed)."""
  plain = unflatten_dict({p: np.asarray(v) for p, v in flatten_dict(variables).items()})
  data = flax.serialization.msgpack_serialize(plain)
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  write_atomic(path, lambda f: f.write(data))


def sidecar_path(path: str | os.PathLike) -> str:
  """The metadata file of a variables file: ``FILE.json`` next to ``FILE.msgpack``."""
  return os.path.splitext(os.fspath(path))[0] + ".json"


def checkpoint_metadata(model: str, input_shape, num_classes: int, dataset: str | None,
                        train_split: str | None, source: str | None = None) -> dict:
  """The ``checkpoint`` entry of a sidecar: what the variables were made for."""
  return {"model": model, "input_shape": [int(x) for x in input_shape],
          "num_classes": int(num_classes), "dataset": dataset, "train_split": train_split,
          "source": source}


def default_checkpoint(model: str = models.DEFAULT_MODEL) -> str:
  """The shipped variables file ``checkpoint="default"`` means for ``model``.

  Raises:
    ValueError: ``model`` has no shipped checkpoint.
  """
  if model not in DEFAULT_CHECKPOINTS:
    raise ValueError(f"checkpoint='default': no checkpoint of model={model!r} is shipped; "
                     f"allowed: checkpoint='default' with model in {sorted(DEFAULT_CHECKPOINTS)}"
                     ", or a variables file (nemo-jax train / nemo-jax convert)")
  return os.path.join(ASSETS, DEFAULT_CHECKPOINTS[model])


def resolve_checkpoint(checkpoint: str, model: str = models.DEFAULT_MODEL) -> str:
  """The variables file of a config's ``checkpoint`` for ``model`` (``"default"``: the
  shipped one, :func:`default_checkpoint`)."""
  return default_checkpoint(model) if checkpoint == "default" else checkpoint


def _sidecar(checkpoint: str, model: str) -> dict | None:
  """The parsed sidecar of a checkpoint (a JSON object), or None."""
  if checkpoint == "default" and model not in DEFAULT_CHECKPOINTS:
    return None
  path = sidecar_path(resolve_checkpoint(checkpoint, model))
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  return {"path": path, "meta": meta} if isinstance(meta, Mapping) else None


def checkpoint_info(checkpoint: str, model: str = models.DEFAULT_MODEL) -> dict | None:
  """What a variables file was made for, from its sidecar (``sidecar_path``), or None.

  Reads the ``checkpoint`` entry (written by ``nemo-jax train`` / ``nemo-jax convert``)
  or, for older ``nemo-jax train`` sidecars (the shipped default's), derives it from the
  training ``config``: ``{"model", "input_shape", "num_classes", "dataset",
  "train_split", "file"}`` (a field may be None). A ``.json`` next to the file that is
  neither is not a sidecar (None). ``model``: whose shipped checkpoint ``"default"`` is.
  """
  sidecar = _sidecar(checkpoint, model)
  if sidecar is None:
    return None
  path, meta = sidecar["path"], sidecar["meta"]
  info = meta.get("checkpoint")
  if isinstance(info, Mapping) and isinstance(info.get("model"), str):
    info = dict(info)
  else:
    config = meta.get("config")
    if not (isinstance(config, Mapping) and isinstance(config.get("model"), str)
            and "epochs" in config):
      return None
    spec = data_lib.DATASETS.get(config.get("dataset"))
    info = {"model": config["model"], "dataset": config.get("dataset"),
            "input_shape": None if spec is None else list(spec.input_shape),
            "num_classes": None if spec is None else spec.num_classes,
            "train_split": "train"}
  info["file"] = path
  return info


def same_data(a: str | None, b: str | None) -> bool:
  """Whether two dataset names hold the same images (e.g. the shipped Fashion-MNIST subset
  and Fashion-MNIST)."""
  if a is None or b is None:
    return False
  return a == b or (a in data_lib.DATASETS and data_lib.DATASETS[a] == data_lib.DATASETS.get(b))


def check_metadata(checkpoint: str, name: str, input_shape, num_classes: int | None,
                   dataset: str | None = None) -> None:
  """A checkpoint's sidecar (when present) agrees with the model it is loaded for: its
  model, input shape, number of classes and (a named dataset) the data it was trained on.

  Raises:
    ValueError naming the field, the sidecar's value and the config's.
  """
  info = checkpoint_info(checkpoint, name)
  if info is None:
    return
  for field, want in (("model", name), ("input_shape", list(input_shape)),
                      ("num_classes", num_classes)):
    have = info.get(field)
    if have is not None and want is not None and have != want:
      raise ValueError(f"checkpoint={checkpoint!r} was made for {field}={have!r} (its "
                       f"metadata {info['file']}), the config has {field}={want!r}; "
                       f"allowed: {field}={have!r}, or a checkpoint made for {want!r}")
  have = info.get("dataset")
  if (have is not None and dataset is not None and dataset in data_lib.DATASETS
      and not same_data(have, dataset)):
    raise ValueError(f"checkpoint={checkpoint!r} was trained on dataset={have!r} (its "
                     f"metadata {info['file']}), the config has dataset={dataset!r}; "
                     f"allowed: dataset={have!r}, or a checkpoint trained on {dataset!r}")


def check_held_out(checkpoint: str, dataset: str, split: str | None, field: str,
                   model: str = models.DEFAULT_MODEL) -> None:
  """The split a run reports as held out is not the one the checkpoint was trained on.

  Raises:
    ValueError naming ``field``, the split and the checkpoint's metadata.
  """
  if split is None:
    return
  info = checkpoint_info(checkpoint, model)
  if info is None or info.get("train_split") != split or not same_data(info.get("dataset"),
                                                                       dataset):
    return
  raise ValueError(f"{field}={split!r} is the split checkpoint={checkpoint!r} was trained on "
                   f"(dataset {info.get('dataset')!r}, its metadata {info['file']}), so its "
                   f"accuracy would not be held out; allowed: another split of {dataset!r} "
                   "(e.g. 'test') or None")


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


def load_default_model(name: str = models.DEFAULT_MODEL):
  """A shipped model: ``(model, variables)`` (default: resnet20 on Fashion-MNIST).

  Args:
    name: a zoo model with a shipped checkpoint (``DEFAULT_CHECKPOINTS``).

  Made by ``experiments/configs/train_default.py`` (resnet20) and
  ``train_mobilenet.py`` (mobilenet_v2_small); their training configs and metrics are in
  the ``.json`` beside each file in ``nemo_jax/assets/``.
  """
  path = default_checkpoint(name)
  shape, classes = models.DEFAULT_INPUT_SHAPE, models.DEFAULT_NUM_CLASSES
  model = models.get_model(name, input_shape=shape, num_classes=classes)
  return model, load_variables(path, model, shape)


def load_model(name: str, checkpoint: str, input_shape, num_classes: int,
               registry: models.ModelRegistry | None = None, dataset: str | None = None):
  """A registered model and its variables: the one loader of searches, libraries, exports.

  Args:
    name: registered model name (the zoo, or ``registry``).
    checkpoint: ``"default"`` (the shipped model, only for its own name, shape and
      classes) or a variables file written by ``nemo-jax convert`` / ``nemo-jax train``.
    input_shape: ``(H, W, C)``.
    num_classes: logits.
    registry: where ``name`` is looked up (default: the zoo).
    dataset: the data it will be evaluated on (checked against a variables file's
      metadata, when it has one).

  Returns:
    ``(model, variables)``.

  Raises:
    ValueError: unknown model, a missing file, or a checkpoint that does not match (its
      metadata: model, input shape, number of classes, dataset; its variables' shapes,
      the classifier's included).
  """
  models.check_model_name(name, registry=registry)
  shape = tuple(input_shape)
  if checkpoint == "default":
    default_checkpoint(name)   # a model without a shipped checkpoint: the error
    default = (tuple(models.DEFAULT_INPUT_SHAPE), models.DEFAULT_NUM_CLASSES)
    if (shape, num_classes) != default:
      raise ValueError(f"checkpoint='default' is the {name} {default[0]} model with "
                       f"{default[1]} classes; for input_shape={shape} "
                       f"num_classes={num_classes} give a checkpoint path")
    return load_default_model(name)
  if not os.path.exists(checkpoint):
    raise ValueError(f"checkpoint={checkpoint!r}: no such file; give 'default' or a "
                     "variables file written by `nemo-jax convert` / `nemo-jax train`")
  if os.path.isdir(checkpoint):
    raise ValueError(f"checkpoint={checkpoint!r} is a directory; allowed: 'default' or a "
                     "variables file (.msgpack)")
  check_metadata(checkpoint, name, shape, num_classes, dataset)
  model = models.get_model(name, input_shape=shape, num_classes=num_classes, registry=registry)
  return model, load_variables(checkpoint, model, shape)


def training_images(checkpoint: str, model: str = models.DEFAULT_MODEL) -> dict | None:
  """What a ``nemo-jax train`` checkpoint was trained on, from its sidecar's training
  config: ``{"dataset", "split", "held_out_per_class", "held_out_seed"}`` (the split is
  ``"train"`` minus ``held_out_per_class`` images per class, ``data.held_out_split``),
  or None for a checkpoint without such a sidecar (converted, or written elsewhere).
  ``model``: whose shipped checkpoint ``"default"`` is."""
  sidecar = _sidecar(checkpoint, model)
  config = None if sidecar is None else sidecar["meta"].get("config")
  if not isinstance(config, Mapping) or "epochs" not in config:
    return None
  return {"dataset": config.get("dataset"), "split": "train",
          "held_out_per_class": int(config.get("held_out_per_class", 0)),
          "held_out_seed": int(config.get("held_out_seed", 0))}
