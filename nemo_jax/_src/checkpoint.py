"""Saving and strictly loading model variables (a single msgpack file).

Model checkpoints are small single files (flax.serialization msgpack) so the default one
can ship inside the package; search state uses orbax (see ``search/engine.py``).
Loading is strict: every leaf must exist in the model's own variable tree with the same
shape, and the error names everything that did not match.
"""

from __future__ import annotations

import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np


def save_variables(path: str | os.PathLike, variables) -> None:
  """Writes ``variables`` (a pytree of arrays) to ``path`` atomically."""
  data = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(variables)))
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
    return out
  return {"/".join(prefix): tree}


def check_variables_match(expected, loaded, what: str = "checkpoint") -> None:
  """Raises ValueError naming every missing, unexpected or mis-shaped leaf."""
  exp = {k: np.shape(v) for k, v in _flatten(flax.core.unfreeze(expected)).items()}
  got = {k: np.shape(v) for k, v in _flatten(flax.core.unfreeze(loaded)).items()}
  problems = []
  problems += [f"missing {k} {exp[k]}" for k in sorted(set(exp) - set(got))]
  problems += [f"unexpected {k} {got[k]}" for k in sorted(set(got) - set(exp))]
  problems += [f"shape mismatch {k}: model {exp[k]}, {what} {got[k]}"
               for k in sorted(set(exp) & set(got)) if exp[k] != got[k]]
  if problems:
    raise ValueError(f"{what} does not match the model: " + "; ".join(problems))


def load_variables(path: str | os.PathLike, model=None, input_shape=None):
  """Reads variables written by :func:`save_variables`.

  Args:
    path: file path.
    model: if given (with ``input_shape`` = (H, W, C)), the loaded tree is checked
      strictly against ``model.init``'s tree (structure and shapes).

  Returns:
    The variables as a dict of jnp arrays.
  """
  try:
    with open(path, "rb") as f:
      raw = flax.serialization.msgpack_restore(f.read())
  except OSError as e:
    raise ValueError(f"checkpoint {path}: cannot be read ({e.strerror})") from None
  if model is not None:
    if input_shape is None:
      raise ValueError("load_variables: input_shape is required with model")
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                 jnp.zeros((1, *input_shape), jnp.float32)))
    check_variables_match(expected, raw, what=f"checkpoint {path}")
  return jax.tree.map(jnp.asarray, raw)
