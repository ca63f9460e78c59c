"""torchvision checkpoints -> Flax variables of the model zoo, and saving/loading them.

Convertible models: ``mobilenet_v2``, ``resnet18``, ``resnet50``, ``resnext101_32x8d``
(the zoo mirrors torchvision's module structure; ``resnet20`` / ``vgg16_cifar`` have no
torchvision counterpart). Tensor layouts:

* conv weight ``[O, I/groups, kh, kw]`` (OIHW) -> kernel ``[kh, kw, I/groups, O]`` (HWIO);
* linear weight ``[out, in]`` -> kernel ``[in, out]``; biases unchanged;
* BatchNorm ``weight, bias`` -> params ``scale, bias``; ``running_mean, running_var``
  -> batch_stats ``mean, var`` (``num_batches_tracked`` is dropped).

Conversion is strict: every torch tensor must be used and every Flax variable filled
with the right shape; otherwise a ValueError lists every offending name.

torch is optional: it is imported only to read ``.pth`` files. Converted variables
are stored with ``flax.serialization`` msgpack (``checkpoint.save_variables`` /
``checkpoint.load_variables`` are the only places that know the file format).
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from nemo_jax._src import models
from nemo_jax._src.checkpoint import SEP as _SEP
from nemo_jax._src.checkpoint import flatten_dict as _flat
from nemo_jax._src.checkpoint import checkpoint_metadata, save_variables, sidecar_path
from nemo_jax._src.checkpoint import unflatten_dict as _unflat
from nemo_jax._src.faults import MissingDependency, check_output_file, write_json



def _resnet_torch_module(path: tuple[str, ...], tree: Mapping) -> str:
  """Flax module path -> torchvision module name for ResNet / ResNeXt.

  Args:
    path: Flax module names, e.g. ``("layer1_0", "downsample_bn")``.
    tree: the model's ``params`` tree (unused here).
  """
  del tree
  out = []
  for name in path:
    stage_block = re.fullmatch(r"(layer\d+)_(\d+)", name)
    if stage_block:
      out += [stage_block.group(1), stage_block.group(2)]
    elif name == "downsample_conv":
      out += ["downsample", "0"]
    elif name == "downsample_bn":
      out += ["downsample", "1"]
    else:
      out.append(name)
  return ".".join(out)


def _mobilenet_v2_torch_module(path: tuple[str, ...], tree: Mapping) -> str:
  """Flax module path -> torchvision module name for MobileNet-V2.

  Args:
    path: Flax module names, e.g. ``("features_2", "dw_bn")``.
    tree: the model's ``params`` tree (to see whether a block has an expansion).
  """
  block = path[0]
  if block == "classifier":
    return "classifier.1"  # classifier.0 is the dropout
  index = int(block.split("_")[1])
  role = path[1]
  if role in ("conv", "bn"):  # features.0 / features.18: Conv2dNormActivation
    return f"features.{index}.{0 if role == 'conv' else 1}"
  # InvertedResidual.conv is a Sequential whose indices shift without expansion.
  roles = ["dw", "project_conv", "project_bn"]
  if "expand_conv" in tree[block]:
    roles = ["expand"] + roles
  stem, _, kind = role.rpartition("_")
  if role.startswith(("expand", "dw")):
    return f"features.{index}.conv.{roles.index(stem)}.{0 if kind == 'conv' else 1}"
  return f"features.{index}.conv.{roles.index(role)}"


# model name -> (flax module path -> torch module name, torch classifier weight key)
_CONVERTIBLE: dict[str, tuple[Callable, str]] = {
    "mobilenet_v2": (_mobilenet_v2_torch_module, "classifier.1.weight"),
    "resnet18": (_resnet_torch_module, "fc.weight"),
    "resnet50": (_resnet_torch_module, "fc.weight"),
    "resnext101_32x8d": (_resnet_torch_module, "fc.weight"),
}

_LEAF_TO_TORCH = {("params", "scale"): "weight", ("params", "bias"): "bias",
                  ("params", "kernel"): "weight", ("batch_stats", "mean"): "running_mean",
                  ("batch_stats", "var"): "running_var"}


def convertible_models() -> list[str]:
  """Names that :func:`torchvision_to_flax` can convert."""
  return sorted(_CONVERTIBLE)


def torch_module_name(model_name: str, flax_module_path: str, params: Mapping) -> str:
  """The torchvision module name of a Flax module, e.g. ``layer1_0/downsample_conv``.

  Args:
    model_name: one of :func:`convertible_models`.
    flax_module_path: ``/``-separated Flax module path (``LayerInfo.name``).
    params: the model's ``params`` tree (arrays or shapes).

  Returns:
    e.g. ``"layer1.0.downsample.0"``.
  """
  to_torch_module, _ = _check_convertible(model_name)
  return to_torch_module(tuple(flax_module_path.split(_SEP)), params)


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _torch_layout(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  """The torch shape that converts to ``flax_shape``."""
  if leaf == "kernel" and len(flax_shape) == 4:
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)
  if leaf == "kernel" and len(flax_shape) == 2:
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def _from_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
  if leaf == "kernel" and array.ndim == 2:
    return array.T  # (out, in) -> (in, out)
  return array


def _check_convertible(model_name: str) -> tuple[Callable, str]:
  if model_name not in _CONVERTIBLE:
    raise ValueError(f"model_name: {model_name!r} cannot be converted from torchvision; "
                     f"allowed: {convertible_models()}")
  return _CONVERTIBLE[model_name]


def torchvision_to_flax(state_dict: Mapping[str, Any], model_name: str,
                        input_shape=(224, 224, 3), num_classes: int = 1000,
                        **kwargs) -> dict:
  """Converts a torchvision ``state_dict`` to the zoo model's Flax variables.

  Args:
    state_dict: torch module name -> tensor (torch tensors or numpy arrays).
    model_name: one of :func:`convertible_models`.
    input_shape: ``(H, W, C)`` the model is built for (C must match the checkpoint).
    num_classes: classifier outputs (must match the checkpoint).
    **kwargs: model options (e.g. ``width_mult``) passed to ``models.get_model``.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (nested dicts of float32 jax arrays).

  Raises:
    ValueError: unknown model, or (listing all of them) torch keys that are missing,
      unexpected, or of the wrong shape.
  """
  to_torch_module, _ = _check_convertible(model_name)
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"state_dict: expected a mapping of names to tensors, got "
                     f"{type(state_dict).__name__}")
  check_finite_state(state_dict, "state_dict")
  model = models.get_model(model_name, input_shape, num_classes, **kwargs)
  expected = models.abstract_variables(model, input_shape)
  unused = {k for k in state_dict if not k.endswith("num_batches_tracked")}
  missing, mismatched, converted = [], [], {}
  for path, spec in _flat(expected).items():
    collection, module_path, leaf = path[0], path[1:-1], path[-1]
    if (collection, leaf) not in _LEAF_TO_TORCH:
      raise ValueError(f"{_SEP.join(path)}: no torch counterpart known for this variable")
    key = (to_torch_module(module_path, expected["params"]) + "."
           + _LEAF_TO_TORCH[(collection, leaf)])
    if key not in state_dict:
      missing.append(f"{key} (for {_SEP.join(path)}, shape "
                     f"{_torch_layout(spec.shape, leaf)})")
      continue
    unused.discard(key)
    array = _to_numpy(state_dict[key])
    want = _torch_layout(spec.shape, leaf)
    if array.shape != want:
      mismatched.append(f"{key}: checkpoint shape {tuple(array.shape)}, model "
                        f"{model_name} expects {want} (for {_SEP.join(path)})")
      continue
    converted[path] = jnp.asarray(_from_torch_layout(array, leaf), spec.dtype)
  if missing or mismatched or unused:
    parts = []
    if missing:
      parts.append(f"missing keys: {missing}")
    if mismatched:
      parts.append(f"shape mismatches: {mismatched}")
    if unused:
      parts.append(f"unexpected keys: {sorted(unused)}")
    raise ValueError(f"state_dict does not match {model_name} "
                     f"(input_shape={tuple(input_shape)}, num_classes={num_classes}): "
                     + "; ".join(parts))
  return _unflat(converted)


def check_finite_state(state_dict: Mapping[str, Any], where: str) -> None:
  """Rejects a state dict holding NaN / inf, naming the first offending tensor."""
  for key, value in state_dict.items():
    array = _to_numpy(value)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
      bad = int(array.size - np.count_nonzero(np.isfinite(array)))
      raise ValueError(f"{where}: tensor {key!r} holds {bad} NaN/inf value(s); allowed: "
                       "finite weights (re-export or retrain the checkpoint)")


def _import_torch():
  try:
    import torch  # noqa: PLC0415  (optional dependency, imported lazily)
  except ImportError:
    raise MissingDependency("reading .pth checkpoints needs PyTorch: pip install "
                            "'nemo-jax[torch]' (torch==2.14.1, torchvision==0.29.1)") from None
  return torch


def load_torch_checkpoint(path) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint's state dict (``torch.load(..., weights_only=True)``).

  Accepts a bare state dict or a dict holding it under ``'state_dict'`` or ``'model'``;
  a ``'module.'`` prefix (``DataParallel``) is removed.

  Args:
    path: ``.pth`` / ``.pt`` file.

  Returns:
    Name -> numpy array.

  Raises:
    ImportError: torch is not installed.
    ValueError: unreadable file or no state dict inside.
  """
  torch = _import_torch()
  if not os.path.isfile(path):
    raise ValueError(f"checkpoint {path}: no such file")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle errors, non-weights objects, corrupt files
    raise ValueError(f"checkpoint {path}: cannot be read as a weights-only PyTorch "
                     f"checkpoint ({type(e).__name__}: {e})") from None
  if isinstance(obj, Mapping):
    for wrapper in ("state_dict", "model"):
      if isinstance(obj.get(wrapper), Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
    raise ValueError(f"checkpoint {path}: expected a state dict (name -> tensor), or a "
                     "dict holding one under 'state_dict' or 'model'")
  prefix = "module."
  if obj and all(k.startswith(prefix) for k in obj):
    obj = {k[len(prefix):]: v for k, v in obj.items()}
  return {k: _to_numpy(v) for k, v in obj.items()}


def convert_checkpoint(pth_path, model_name: str, out_path, input_shape=(224, 224, 3),
                       num_classes: int | None = None, overwrite: bool = False,
                       **kwargs) -> dict:
  """Converts a torchvision ``.pth`` file to a Flax msgpack file.

  Writes ``out_path`` and its metadata sidecar (``checkpoint.sidecar_path``: model,
  classes, source; loading checks them against a config).

  Args:
    pth_path: PyTorch checkpoint (see :func:`load_torch_checkpoint`).
    model_name: one of :func:`convertible_models`.
    out_path: destination ``.msgpack`` file.
    input_shape: ``(H, W, C)`` of the images.
    num_classes: None reads it from the checkpoint's classifier.
    overwrite: replace ``out_path`` / its sidecar if they exist (default: refuse).
    **kwargs: model options.

  Returns:
    The converted variables.

  Raises:
    ValueError: a bad model name or checkpoint, a tensor holding NaN / inf (named),
      an output that exists (without ``overwrite``) or cannot be written; checked
      before anything is written.
  """
  _, classifier_key = _check_convertible(model_name)
  check_output_file(out_path, overwrite, "out", extra=(sidecar_path(out_path),))
  state_dict = load_torch_checkpoint(pth_path)
  check_finite_state(state_dict, f"checkpoint {pth_path}")
  if num_classes is None:
    if classifier_key not in state_dict:
      raise ValueError(f"checkpoint {pth_path}: no {classifier_key!r} to read num_classes "
                       f"from; pass num_classes")
    num_classes = int(state_dict[classifier_key].shape[0])
  variables = torchvision_to_flax(state_dict, model_name, input_shape, num_classes, **kwargs)
  save_variables(out_path, variables)
  # The weights do not depend on the image size (global pooling): only the model, the
  # classes and the source are recorded.
  meta = checkpoint_metadata(model_name, input_shape, num_classes, None, None,
                             os.path.abspath(os.fspath(pth_path)))
  meta["input_shape"] = None
  write_json(sidecar_path(out_path), {"checkpoint": meta})
  return variables
