"""EMOMC stage I: unstructured magnitude-pruning masks of a variable tree.

Every conv/dense kernel (a ``params`` leaf named ``kernel``) is pruned; biases and
BatchNorm never are. A mask keeps exactly ``round(N * keep)`` weights of a kernel with
``N`` weights (ties broken by index, ``quant.magnitude_ranks``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax._src import quant


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
