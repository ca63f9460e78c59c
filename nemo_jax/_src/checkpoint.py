"""Saving and strictly loading model variables (a single msgpack file).

Model checkpoints are small single files (flax.serialization msgpack) so the default one
can ship inside the package; search state uses orbax (see ``search/run.py``).
Loading is strict: every leaf must exist in the model's own variable tree with the same
shape, and the error names everything that did not match.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.serialization
import jax.numpy as jnp
import numpy as np

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
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


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
    ValueError: unreadable file, or (listing all) missing / unexpected / mis-shaped leaves.
  """
  from nemo_jax._src import models  # local: models -> layers -> ... would cycle at import
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
  return unflatten_dict({p: jnp.asarray(found[p], s.dtype) for p, s in expected.items()})
