"""Post-training calibration and batched evaluation of a population of configurations.

This is the hot path of every search: each generation hands a population of
``QuantConfig`` (``w_bits[P, L]``, ``a_bits[P, L]``, ``keep[P]``) to an
:class:`Evaluator`, which returns top-1 / top-5 accuracy and the mean cross-entropy per
member. The search MINIMISES, so accuracy enters its objectives as error ``1 - top1``;
a member whose logits are not finite gets NaN in all three fields, which the search
must treat as invalid (it never raises).

Calibration (as NEMO): the range of every activation quantizer (the input of every
QConv/QDense, in execution order) is the mean over calibration batches of the per-batch
min and max of that input in the float model. It is computed once per (model, params,
dataset) by :func:`calibrate`, stored next to the checkpoint
(:func:`save_calibration` / :func:`load_or_calibrate`) and reused for every config.

Evaluation layout (per configuration):
  1. the kernels are pruned (``keep``, with magnitude ranks precomputed once) and
     fake-quantized (``w_bits``) ONCE per configuration;
  2. the evaluation images, preprocessed once and resident on device as
     ``[num_batches, batch, H, W, C]``, are scanned (``lax.scan``) through the model,
     whose activations are quantized with the calibrated ranges (``a_bits``);
  3. correct-top-1/top-5 counts, the summed loss and a non-finite flag accumulate.

Over the population (strategy, chosen per backend, overridable):
  * ``"map"``: ``lax.map`` over members. Default on CPU, where ``vmap`` over
    per-member conv kernels lowers to grouped convolutions that XLA:CPU runs ~12x
    slower (ENVIRONMENT.md; re-measured by ``benchmarks/evaluate.py``).
  * ``"vmap"``: ``jax.vmap`` over the members of each device (default on GPU/TPU);
    falls back to chunks when the members do not fit in memory (below).
  * ``"chunked_vmap"``: ``lax.map(..., batch_size=chunk_size)``: vmap over chunks of
    ``chunk_size`` members, chunks one after the other.

Memory formula for the vmap strategies (one device, float32)::

    bytes_per_member = 4 * (2 * W + ACTIVATION_FACTOR * batch * A_peak)
    chunk_size       = clip(floor(budget / bytes_per_member), 1, members_per_device)

with ``W`` the number of quantized weights of the model (pruned + quantized copy of
every kernel), ``A_peak`` the largest (input + output) activation elements of one
layer for one image, ``ACTIVATION_FACTOR = 4`` (residual branch, BatchNorm and
quantizer temporaries) and ``budget = memory_fraction * (bytes_limit - bytes_in_use)``
of the device (``Device.memory_stats()``), or ``DEFAULT_MEMORY_BUDGET`` where the
backend reports none (CPU). The resident images cost ``4 * N * H * W * C`` once.

Devices: the (padded) population axis is sharded over a 1-D mesh ``"pop"`` of all
devices (all processes' after ``distributed.initialize``) with ``shard_map``; images,
labels and variables are replicated. Each device evaluates its members with the
strategy above; results are gathered to every host. P is padded with copies of member
0 (results sliced off) so that one compilation serves many population sizes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from functools import partial
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from nemo_jax._src import distributed
from nemo_jax._src import quant
from nemo_jax._src.config import QuantConfig
from nemo_jax._src.layers import LayerInfo, QContext

STRATEGIES = ("auto", "vmap", "map", "chunked_vmap")
ACTIVATION_FACTOR = 4
DEFAULT_MEMORY_BUDGET = 4 * 2**30
DEFAULT_POPULATION_PAD = 8
CALIBRATION_FORMAT = "nemo_jax.calibration.v1"


# --------------------------------------------------------------------------- calibration


@flax.struct.dataclass
class Calibration:
  """Calibrated activation ranges, one per activation quantizer (layer input).

  Attributes:
    lo: float32 ``[L]`` mean over batches of the per-batch minimum of layer i's input.
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


def fingerprint(variables, images, batch_size: int = 0, num_batches: int | None = None) -> str:
  """SHA-256 (hex, 16 chars) of the variables' paths and bytes, the images and batching."""
  digest = hashlib.sha256()
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
              num_batches: int | None = None) -> Calibration:
  """NEMO post-training calibration of the activation quantizers.

  Runs the FLOAT model (BatchNorm in inference mode) on consecutive batches of
  ``images`` and, per quantized layer, averages the per-batch min and max of its input.

  Args:
    model: a zoo model (``__call__(x, ctx, train)``).
    variables: its variables (``params`` and ``batch_stats``).
    images: preprocessed calibration images ``[N, H, W, C]`` (training data, typically).
    batch_size: images per calibration batch (the last batch may be smaller).
    num_batches: use only the first ``num_batches`` batches (None: all).

  Returns:
    A :class:`Calibration` with ``lo[L]``, ``hi[L]``.
  """
  images = np.asarray(images, np.float32)
  slices = _batch_slices(len(images), batch_size, num_batches)

  @jax.jit
  def observe(variables, x):
    ctx = QContext(observe=True)
    model.apply(variables, x, ctx, train=False)
    if not ctx.observed:
      raise ValueError("model: no QConv/QDense layer observed; nothing to calibrate")
    return (jnp.stack([o[0] for o in ctx.observed]).astype(jnp.float32),
            jnp.stack([o[1] for o in ctx.observed]).astype(jnp.float32))

  lo_sum = hi_sum = 0.0
  for sl in slices:
    lo, hi = observe(variables, jnp.asarray(images[sl]))
    # Accumulate in float64 so the mean does not depend on summation rounding.
    lo_sum = lo_sum + np.asarray(lo, np.float64)
    hi_sum = hi_sum + np.asarray(hi, np.float64)
  n = len(slices)
  return Calibration(lo=jnp.asarray(lo_sum / n, jnp.float32),
                     hi=jnp.asarray(hi_sum / n, jnp.float32), num_batches=n,
                     fingerprint=fingerprint(variables, images, batch_size, num_batches))


def save_calibration(path: str | os.PathLike, calibration: Calibration) -> None:
  """Writes a calibration as a small JSON file (float32 values round-trip exactly)."""
  data = {"format": CALIBRATION_FORMAT,
          "num_batches": int(calibration.num_batches),
          "fingerprint": calibration.fingerprint,
          "lo": [float(v) for v in np.asarray(calibration.lo, np.float32).tolist()],
          "hi": [float(v) for v in np.asarray(calibration.hi, np.float32).tolist()]}
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache


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


def load_or_calibrate(path: str | os.PathLike, model: nn.Module, variables, images,
                      batch_size: int = 256, num_batches: int | None = None) -> Calibration:
  """The cached calibration at ``path`` if it matches (variables, images), else a new one.

  A new calibration is written to ``path`` (next to the checkpoint, typically).
  """
  expected = fingerprint(variables, np.asarray(images, np.float32), batch_size, num_batches)
  if os.path.exists(path):
    cached = load_calibration(path)
    if cached.fingerprint == expected:
      return cached
  calib = calibrate(model, variables, images, batch_size, num_batches)
  save_calibration(path, calib)
  return calib


# --------------------------------------------------------------------------- tracing


class _KernelRecorder(QContext):
  """Float context that records every layer's kernel (execution order)."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.kernels: list = []

  def quantize_kernel(self, kernel, i):
    self.kernels.append(kernel)
    return kernel


class _PrecomputedKernelContext(QContext):
  """Quantizes activations as usual but uses kernels already pruned + quantized.

  Lets a configuration's kernels be quantized once and reused for every image batch.
  """

  def __init__(self, kernels: Sequence[jax.Array], **kwargs):
    super().__init__(**kwargs)
    self.kernels = kernels

  def quantize_kernel(self, kernel, i):
    if kernel.shape != self.kernels[i].shape:
      raise ValueError(f"layer {i}: precomputed kernel shape {self.kernels[i].shape} "
                       f"!= model kernel shape {kernel.shape}")
    return self.kernels[i]


def trace_kernels(model: nn.Module, variables, input_shape) -> tuple[list, list[LayerInfo]]:
  """The float kernels (execution order) and :class:`LayerInfo` of every quantized layer."""
  infos: list[LayerInfo] = []

  @jax.jit
  def kernels_of(variables):
    ctx = _KernelRecorder(on_layer=infos.append)
    model.apply(variables, jnp.zeros((1, *input_shape), jnp.float32), ctx, train=False)
    return list(ctx.kernels)

  kernels = kernels_of(variables)
  if not kernels:
    raise ValueError("model: has no QConv/QDense layer; allowed: a quantizable zoo model")
  return kernels, infos


# --------------------------------------------------------------------------- evaluation


class EvalResult(NamedTuple):
  """Per-member evaluation results (numpy float32, on every host).

  ``top1``/``top5`` are accuracies as fractions in [0, 1] (the search minimises the
  error ``1 - top1``), ``loss`` the mean cross-entropy; NaN where a member's logits
  were not finite (an invalid configuration).
  """
  top1: np.ndarray
  top5: np.ndarray
  loss: np.ndarray


def default_strategy(platform: str) -> str:
  """``"map"`` on CPU, ``"vmap"`` elsewhere (GPU/TPU)."""
  return "map" if platform == "cpu" else "vmap"


def member_bytes(num_weights: int, peak_activation: int, batch_size: int,
                 itemsize: int = 4) -> int:
  """Device bytes one vmapped member needs (see the module docstring's formula)."""
  return itemsize * (2 * num_weights + ACTIVATION_FACTOR * batch_size * peak_activation)


def memory_budget(device: jax.Device, memory_fraction: float = 0.5) -> int:
  """``memory_fraction`` of the device's free memory, or the default where unknown."""
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    stats = None
  if not stats or "bytes_limit" not in stats:
    return DEFAULT_MEMORY_BUDGET
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  return int(memory_fraction * max(free, 0))


def _batch_stats(logits, labels, mask, k: int):
  """Correct top-1/top-k counts, summed NLL and number of non-finite rows (valid rows)."""
  logits = logits.astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(logits), axis=-1)
  top1 = (jnp.argmax(logits, axis=-1) == labels) & mask
  _, topk_idx = jax.lax.top_k(logits, k)
  topk = jnp.any(topk_idx == labels[:, None], axis=-1) & mask
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  loss = jnp.sum(jnp.where(mask & finite, nll, 0.0))
  bad = jnp.sum(mask & ~finite)
  return (jnp.sum(top1, dtype=jnp.int32), jnp.sum(topk, dtype=jnp.int32), loss,
          bad.astype(jnp.int32))


def _scan_images(apply_fn: Callable, images, labels, mask, k: int):
  """Runs ``apply_fn(x)`` over the image batches.

  Returns:
    ``(top1_count, topk_count, loss_sum, nonfinite_count)`` scalars; fractions are
    formed on the host (:func:`_finalize`) so they are exactly ``count / N``.
  """
  def body(acc, batch):
    x, y, m = batch
    stats = _batch_stats(apply_fn(x), y, m, k)
    return tuple(a + s for a, s in zip(acc, stats)), None

  init = (jnp.int32(0), jnp.int32(0), jnp.float32(0.0), jnp.int32(0))
  acc, _ = jax.lax.scan(body, init, (images, labels, mask))
  return acc


def _finalize(stats, num_images: int, population: int | None = None) -> EvalResult:
  """Host side: counts -> fractions (float64 division, then float32); NaN if non-finite."""
  c1, ck, loss, bad = (distributed.to_host(s) for s in stats)
  if population is not None:
    c1, ck, loss, bad = c1[:population], ck[:population], loss[:population], bad[:population]
  invalid = bad > 0
  def frac(v):
    return np.where(invalid, np.nan, np.asarray(v, np.float64) / num_images).astype(np.float32)
  return EvalResult(top1=frac(c1), top5=frac(ck), loss=frac(loss))


def _check_configs(configs: QuantConfig, num_layers: int) -> tuple[np.ndarray, ...]:
  """Host-side validation; returns (w_bits[P, L], a_bits[P, L], keep[P or P, L])."""
  if not isinstance(configs, QuantConfig):
    raise ValueError(f"configs: got {type(configs).__name__}; allowed: QuantConfig")
  w = np.asarray(configs.w_bits)
  a = np.asarray(configs.a_bits)
  keep = np.asarray(configs.keep, np.float32)
  if w.ndim == 1:  # a single member
    w, a, keep = w[None], a[None], keep[None]
  for field, bits in (("w_bits", w), ("a_bits", a)):
    if bits.ndim != 2 or bits.shape[1] != num_layers or bits.shape[0] < 1:
      raise ValueError(f"{field}: shape {bits.shape}; allowed: [P, {num_layers}] "
                       f"(one bit-width per quantized layer), P >= 1")
    if not np.all(np.isfinite(bits)) or np.any(bits != np.round(bits)):
      raise ValueError(f"{field}: non-integer bit-width(s); allowed: integers "
                       f"{quant.MIN_BITS}..{quant.MAX_BITS}")
    bad = (bits < quant.MIN_BITS) | (bits > quant.MAX_BITS)
    if np.any(bad):
      p, i = np.argwhere(bad)[0]
      raise ValueError(f"{field}[{p}, {i}]: bit-width {bits[p, i]} outside the allowed "
                       f"range {quant.MIN_BITS}..{quant.MAX_BITS} ({quant.FLOAT_BITS} = float)")
  if a.shape[0] != w.shape[0]:
    raise ValueError(f"a_bits: population size {a.shape[0]} != w_bits' {w.shape[0]}")
  if keep.shape not in ((w.shape[0],), w.shape):
    raise ValueError(f"keep: shape {keep.shape}; allowed: [{w.shape[0]}] or {list(w.shape)}")
  if not np.all((keep > 0) & (keep <= 1)):
    raise ValueError(f"keep: value {keep[~((keep > 0) & (keep <= 1))].flat[0]!r} outside "
                     "the allowed range (0, 1]")
  return w.astype(np.int32), a.astype(np.int32), keep


class Evaluator:
  """Evaluates populations of configurations of one (model, variables, calibration, data).

  Created once per search: the images are preprocessed and moved to the device(s) here,
  magnitude ranks for pruning are precomputed, and each padded population size compiles
  once.

  Args:
    model: zoo model (``__call__(x, ctx, train)``).
    variables: its variables.
    calibration: :class:`Calibration` of this model (``lo``/``hi`` per layer).
    images: evaluation images ``[N, H, W, C]`` (preprocessed unless ``preprocess``).
    labels: int labels ``[N]``.
    batch_size: upper bound on images per forward pass; batches are balanced
      (``ceil(N / ceil(N / batch_size))``) so padding wastes < 1 image per batch.
    population_pad: members per device are padded to a multiple of this (one
      compilation serves every P up to the padded size). None: the next power of two
      up to ``DEFAULT_POPULATION_PAD`` (8) members per device, then the next multiple
      of 8 (a single config costs one member, a population of 100 on one device 104).
    strategy: ``"auto"`` | ``"vmap"`` | ``"map"`` | ``"chunked_vmap"`` (module docstring).
    chunk_size: members per vmapped chunk (vmap strategies); None: from the memory
      formula.
    mesh: 1-D ``jax.sharding.Mesh`` with axis ``"pop"``; None: all devices.
    preprocess: optional function applied once to ``images`` (e.g.
      ``partial(data.preprocess, name)``).
    weight_quant: weight quantizer mode (``quant.WEIGHT_MODES``).
    memory_fraction: fraction of free device memory the vmap chunks may use.

  The number of classes is read off the model's output; top-5 uses
  ``k = min(5, num_classes)``.
  """

  def __init__(self, model: nn.Module, variables, calibration: Calibration, images, labels,
               batch_size: int = 256, population_pad: int | None = None,
               strategy: str = "auto", chunk_size: int | None = None,
               mesh: Mesh | None = None, preprocess: Callable | None = None,
               weight_quant: str = "symmetric_per_channel", memory_fraction: float = 0.5):
    if strategy not in STRATEGIES:
      raise ValueError(f"strategy={strategy!r}; allowed: {STRATEGIES}")
    if population_pad is not None and (not isinstance(population_pad, int) or population_pad < 1):
      raise ValueError(f"population_pad={population_pad!r}; allowed: None or a positive integer")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
      raise ValueError(f"chunk_size={chunk_size!r}; allowed: None or a positive integer")
    if weight_quant not in quant.WEIGHT_MODES:
      raise ValueError(f"weight_quant={weight_quant!r}; allowed: {quant.WEIGHT_MODES}")
    if not 0 < memory_fraction <= 1:
      raise ValueError(f"memory_fraction={memory_fraction!r}; allowed: (0, 1]")
    if preprocess is not None:
      images = preprocess(images)
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    if images.ndim != 4 or len(images) < 1:
      raise ValueError(f"images: shape {images.shape}; allowed: [N, H, W, C] with N >= 1")
    if labels.shape != (len(images),):
      raise ValueError(f"labels: shape {labels.shape}; allowed: [{len(images)}] (one per image)")

    self.model = model
    self.mesh = distributed.population_mesh() if mesh is None else mesh
    if self.mesh.axis_names != (distributed.POP_AXIS,):
      raise ValueError(f"mesh: axis names {self.mesh.axis_names}; allowed: "
                       f"({distributed.POP_AXIS!r},)")
    self.num_devices = self.mesh.devices.size
    self.platform = self.mesh.devices.flat[0].platform
    self.strategy = default_strategy(self.platform) if strategy == "auto" else strategy
    self.population_pad = population_pad
    self.weight_quant = weight_quant
    self.num_images = len(images)

    kernels, self.layers = trace_kernels(model, variables, images.shape[1:])
    self.num_layers = len(kernels)
    if calibration.num_layers != self.num_layers:
      raise ValueError(f"calibration: {calibration.num_layers} activation ranges, the model "
                       f"has {self.num_layers} quantized layers; allowed: equal counts")
    out = jax.eval_shape(lambda v, x: model.apply(v, x, None, train=False), variables,
                         jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32))
    self.num_classes = int(out.shape[-1])
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f"labels: values in [{labels.min()}, {labels.max()}]; allowed: "
                       f"0..{self.num_classes - 1}")
    self.top_k = min(5, self.num_classes)

    # Balanced image batches, zero-padded and masked: [num_batches, batch, ...].
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r}; allowed: a positive integer")
    num_batches = math.ceil(self.num_images / batch_size)
    self.batch_size = math.ceil(self.num_images / num_batches)
    total = num_batches * self.batch_size
    pad = total - self.num_images
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
    labels = np.concatenate([labels.astype(np.int32), np.zeros((pad,), np.int32)])
    mask = np.arange(total) < self.num_images
    shape = (num_batches, self.batch_size)

    self.num_weights = sum(int(np.prod(k.shape)) for k in kernels)
    self.peak_activation = max(
        info.in_hw[0] * info.in_hw[1] * info.in_channels
        + info.out_hw[0] * info.out_hw[1] * info.out_channels for info in self.layers)
    self.member_bytes = member_bytes(self.num_weights, self.peak_activation, self.batch_size)
    self.memory_budget = memory_budget(self.mesh.devices.flat[0], memory_fraction)
    self._chunk_size = chunk_size

    ranks = [quant.magnitude_ranks(k) for k in kernels]
    replicated = distributed.replicated_sharding(self.mesh)
    self._data = distributed.put_global(
        {"variables": variables, "kernels": kernels, "ranks": ranks,
         "lo": calibration.lo, "hi": calibration.hi,
         "images": images.reshape(*shape, *images.shape[1:]),
         "labels": labels.reshape(shape), "mask": mask.reshape(shape)}, replicated)
    self._compiled: dict[int, Callable] = {}
    self._float_result: EvalResult | None = None
    self._float_fn: Callable | None = None

  # -- sizes ---------------------------------------------------------------------------

  def padded_size(self, population: int) -> int:
    """The population size ``population`` is padded to (a multiple of the devices)."""
    d = self.num_devices
    per_device = math.ceil(population / d)
    if self.population_pad is None:
      if per_device <= DEFAULT_POPULATION_PAD:
        return (1 << math.ceil(math.log2(per_device))) * d
      unit = DEFAULT_POPULATION_PAD
    else:
      unit = self.population_pad
    return math.ceil(per_device / unit) * unit * d

  def chunk_size_for(self, members_per_device: int) -> int:
    """Members vmapped together per device under the current strategy."""
    if self.strategy == "map":
      return 1
    if self._chunk_size is not None:
      return min(self._chunk_size, members_per_device)
    fit = max(1, self.memory_budget // self.member_bytes)
    return int(min(fit, members_per_device))

  # -- the per-member computation ------------------------------------------------------

  def _member(self, data, w_bits, a_bits, keep):
    """Top-1, top-k, loss of one configuration (traced)."""
    weight_ctx = QContext(w_bits=w_bits, keep=keep, prune_ranks=data["ranks"],
                          weight_quant=self.weight_quant)
    # Prune + quantize every kernel once per configuration, not once per image batch.
    qkernels = [weight_ctx.quantize_kernel(k, i) for i, k in enumerate(data["kernels"])]

    def apply_fn(x):
      ctx = _PrecomputedKernelContext(qkernels, a_bits=a_bits,
                                      act_ranges=(data["lo"], data["hi"]),
                                      weight_quant=self.weight_quant)
      return self.model.apply(data["variables"], x, ctx, train=False)

    return _scan_images(apply_fn, data["images"], data["labels"], data["mask"], self.top_k)

  def _build(self, padded: int) -> Callable:
    members_per_device = padded // self.num_devices
    chunk = self.chunk_size_for(members_per_device)
    strategy = self.strategy

    def local(data, w_bits, a_bits, keep):
      member = partial(self._member, data)
      if strategy == "map":
        return jax.lax.map(lambda c: member(*c), (w_bits, a_bits, keep))
      if chunk >= w_bits.shape[0]:
        return jax.vmap(member)(w_bits, a_bits, keep)
      return jax.lax.map(lambda c: member(*c), (w_bits, a_bits, keep), batch_size=chunk)

    pop = PartitionSpec(distributed.POP_AXIS)
    sharded = jax.shard_map(local, mesh=self.mesh, in_specs=(PartitionSpec(), pop, pop, pop),
                            out_specs=pop, check_vma=False)
    # Replicated outputs: XLA all-gathers the (tiny) results so every host can read them.
    return jax.jit(sharded, out_shardings=distributed.replicated_sharding(self.mesh))

  # -- public --------------------------------------------------------------------------

  def __call__(self, configs: QuantConfig) -> EvalResult:
    """Evaluates a population.

    Args:
      configs: ``QuantConfig`` with ``w_bits[P, L]``, ``a_bits[P, L]``, ``keep[P]``
        (a single member without the P axis is accepted and gives P = 1). Every host
        must pass the same population.

    Returns:
      :class:`EvalResult` of float32 ``[P]`` arrays (accuracy as fraction; NaN for
      members with non-finite logits). Minimise ``1 - top1``.
    """
    w, a, keep = _check_configs(configs, self.num_layers)
    population = w.shape[0]
    padded = self.padded_size(population)
    fill = np.zeros(padded - population, np.int64)  # copies of member 0
    w, a, keep = (np.concatenate([v, v[fill]]) for v in (w, a, keep))
    fn = self._compiled.get(padded)
    if fn is None:
      fn = self._compiled[padded] = self._build(padded)
    sharding = distributed.population_sharding(self.mesh)
    w, a, keep = distributed.put_global((w, a, keep), sharding)
    return _finalize(fn(self._data, w, a, keep), self.num_images, population)

  def evaluate_float(self, cached: bool = True) -> EvalResult:
    """Top-1, top-5 and loss (float32 scalars) of the float model (``ctx=None``).

    Args:
      cached: return the first result again (False re-runs it, e.g. for timing).
    """
    if self._float_result is None or not cached:
      if self._float_fn is None:
        def run(data):
          apply_fn = lambda x: self.model.apply(data["variables"], x, None, train=False)
          return _scan_images(apply_fn, data["images"], data["labels"], data["mask"],
                              self.top_k)
        self._float_fn = jax.jit(run, out_shardings=distributed.replicated_sharding(self.mesh))
      self._float_result = _finalize(self._float_fn(self._data), self.num_images)
    return self._float_result


def evaluate(model: nn.Module, variables, calibration: Calibration, configs: QuantConfig,
             images, labels, **kwargs) -> EvalResult:
  """One-shot population evaluation (builds an :class:`Evaluator`; compiles every call).

  In a search build the :class:`Evaluator` once and call it every generation.

  Returns:
    :class:`EvalResult` ``(top1[P], top5[P], loss[P])``; minimise ``1 - top1``.
  """
  return Evaluator(model, variables, calibration, images, labels, **kwargs)(configs)
