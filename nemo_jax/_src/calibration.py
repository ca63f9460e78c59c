"""NEMO post-training calibration of the activation quantizers, and its cache.

The range of every activation quantizer (the input of every quantized layer, in
execution order) is the mean over calibration batches of the per-batch min and max of
that input in the FLOAT model (NEMO, ``docs/DESIGN.md``). It is computed once per
(variables, calibration images, batching) and cached as a small JSON file named by
that fingerprint (:func:`load_or_calibrate`), so a second run with the same model and
data skips it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nemo_jax._src.faults import write_json
from nemo_jax._src.layers import QContext

CALIBRATION_FORMAT = "nemo_jax.calibration.v1"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "nemo_jax", "calibration")


def cache_dir() -> str:
  """``$NEMO_JAX_CACHE_DIR/calibration`` or ``~/.cache/nemo_jax/calibration``."""
  root = os.environ.get("NEMO_JAX_CACHE_DIR")
  path = os.path.join(root, "calibration") if root else DEFAULT_CACHE_DIR
  return os.path.expanduser(path)


@flax.struct.dataclass
class Calibration:
  """Calibrated activation ranges, one per activation quantizer (layer input).

  Attributes:
    lo: float32 ``[La]`` mean over batches of the per-batch minimum of activation
      quantizer q's tensor.
    hi: float32 ``[L]`` mean over batches of the per-batch maximum.
    num_batches: number of calibration batches averaged (static).
    fingerprint: hash of (variables, calibration images, batching) it was computed
      from, or ``""`` (static); used to decide whether a cached file is still valid.
  """
  lo: Any
  hi: Any
  num_batches: int = flax.struct.field(pytree_node=False, default=0)
  fingerprint: str = flax.struct.field(pytree_node=False, default="")

  @property
  def num_layers(self) -> int:
    return int(np.shape(self.lo)[-1])


def _batch_slices(num_images: int, batch_size: int, num_batches: int | None) -> list[slice]:
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}; allowed: a positive integer")
  if num_images < 1:
    raise ValueError(f"images: got {num_images} images; allowed: at least 1")
  slices = [slice(s, min(s + batch_size, num_images)) for s in range(0, num_images, batch_size)]
  if num_batches is not None:
    if not isinstance(num_batches, int) or not 1 <= num_batches <= len(slices):
      raise ValueError(f"num_batches={num_batches!r}; allowed: an integer in "
                       f"1..{len(slices)} ({num_images} images, batch_size={batch_size})")
    slices = slices[:num_batches]
  return slices


def fingerprint(variables, images, batch_size: int = 0, num_batches: int | None = None,
                placement: str = "conv_inputs") -> str:
  """SHA-256 (hex, 16 chars) of the variables' paths and bytes, the images, batching and
  quantizer placement."""
  digest = hashlib.sha256()
  if placement != "conv_inputs":  # (conv_inputs fingerprints predate placements)
    digest.update(f"placement={placement}".encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    arr = np.ascontiguousarray(np.asarray(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(str((arr.dtype.str, arr.shape)).encode())
    digest.update(arr.tobytes())
  arr = np.ascontiguousarray(np.asarray(images))
  digest.update(str((arr.dtype.str, arr.shape, batch_size, num_batches)).encode())
  digest.update(arr.tobytes())
  return digest.hexdigest()[:16]


def calibrate(model: nn.Module, variables, images, batch_size: int = 256,
              num_batches: int | None = None, placement: str = "conv_inputs",
              progress: bool = False) -> Calibration:
  """NEMO post-training calibration of the activation quantizers.

  Runs the FLOAT model (BatchNorm in inference mode) on consecutive batches of
  ``images`` and, per activation quantizer (``placement``), averages the per-batch min
  and max of its tensor.

  Args:
    model: a zoo model (``__call__(x, ctx, train)``).
    variables: its variables (``params`` and ``batch_stats``).
    images: preprocessed calibration images ``[N, H, W, C]`` (training data, typically).
    batch_size: images per calibration batch (the last batch may be smaller).
    num_batches: use only the first ``num_batches`` batches (None: all).
    placement: where activation quantizers sit (``layers.PLACEMENTS``).

  Returns:
    A :class:`Calibration` with ``lo[La]``, ``hi[La]``.
  """
  images = np.asarray(images, np.float32)
  slices = _batch_slices(len(images), batch_size, num_batches)

  @jax.jit
  def observe(variables, x):
    observed = []   # (min, max) per activation quantizer, in creation order

    def record(t, q):
      observed.append((jnp.min(t), jnp.max(t)))
      return t

    model.apply(variables, x, QContext(quantize_input=record, placement=placement), train=False)
    if not observed:
      raise ValueError("model: no QConv/QDense layer observed; nothing to calibrate")
    return (jnp.stack([o[0] for o in observed]).astype(jnp.float32),
            jnp.stack([o[1] for o in observed]).astype(jnp.float32))

  lo_sum = hi_sum = 0.0
  for sl in tqdm(slices, disable=not progress, desc="calibrate", unit="batch"):
    lo, hi = observe(variables, jnp.asarray(images[sl]))
    # Accumulate in float64 so the mean does not depend on summation rounding.
    lo_sum = lo_sum + np.asarray(lo, np.float64)
    hi_sum = hi_sum + np.asarray(hi, np.float64)
  n = len(slices)
  return Calibration(lo=jnp.asarray(lo_sum / n, jnp.float32),
                     hi=jnp.asarray(hi_sum / n, jnp.float32), num_batches=n,
                     fingerprint=fingerprint(variables, images, batch_size, num_batches,
                                             placement))


def save_calibration(path: str | os.PathLike, calibration: Calibration) -> None:
  """Writes a calibration as a small JSON file (float32 values round-trip exactly)."""
  data = {"format": CALIBRATION_FORMAT,
          "num_batches": int(calibration.num_batches),
          "fingerprint": calibration.fingerprint,
          "lo": [float(v) for v in np.asarray(calibration.lo, np.float32).tolist()],
          "hi": [float(v) for v in np.asarray(calibration.hi, np.float32).tolist()]}
  write_json(os.fspath(path), data)  # atomic: a crash never leaves a half-written cache


def load_calibration(path: str | os.PathLike) -> Calibration:
  """Reads a file written by :func:`save_calibration`."""
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"calibration file {path}: not valid JSON ({e})") from None
  if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
    raise ValueError(f"calibration file {path}: format={data.get('format') if isinstance(data, dict) else None!r}; "
                     f"allowed: {CALIBRATION_FORMAT!r}")
  lo = np.asarray(data["lo"], np.float32)
  hi = np.asarray(data["hi"], np.float32)
  if lo.ndim != 1 or lo.shape != hi.shape:
    raise ValueError(f"calibration file {path}: lo/hi shapes {lo.shape}/{hi.shape}; "
                     "allowed: two lists of equal length")
  return Calibration(lo=jnp.asarray(lo), hi=jnp.asarray(hi),
                     num_batches=int(data.get("num_batches", 0)),
                     fingerprint=str(data.get("fingerprint", "")))


def load_or_calibrate(path: str | os.PathLike | None, model: nn.Module, variables, images,
                      batch_size: int = 256, num_batches: int | None = None,
                      placement: str = "conv_inputs", progress: bool = False) -> Calibration:
  """The cached calibration if it matches (variables, images, batching), else a new one.

  Args:
    path: the cache file; None: ``cache_dir()/<fingerprint>.json``.
    model, variables, images, batch_size, num_batches, placement, progress: as
      :func:`calibrate`.

  Returns:
    The calibration; a new one is written to the cache (a read-only cache location
    is skipped silently: the calibration is then recomputed next time).
  """
  expected = fingerprint(variables, np.asarray(images, np.float32), batch_size, num_batches,
                         placement)
  if path is None:
    path = os.path.join(cache_dir(), f"{expected}.json")
  return cached_result(path, expected, load_calibration, save_calibration,
                       lambda: calibrate(model, variables, images, batch_size, num_batches,
                                         placement, progress))


def cached_result(path: str, expected: str, load: Callable, save: Callable,
                  compute: Callable):
  """The cache entry at ``path`` if its ``fingerprint`` is ``expected``, else ``compute()``
  (with ``fingerprint`` set) written there.

  A damaged entry is recomputed, not fatal; a read-only cache location is skipped
  silently (the result is then recomputed next time).
  """
  if os.path.exists(path):
    try:
      cached = load(path)
    except (ValueError, KeyError):
      cached = None
    if cached is not None and cached.fingerprint == expected:
      return cached
  result = compute()
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save(path, result)
  except OSError:
    pass
  return result
