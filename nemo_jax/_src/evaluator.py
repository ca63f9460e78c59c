"""Batched evaluation of a population of configurations: the one evaluator of the package.

This is the hot path of every search: each generation hands a population of
``QuantConfig`` (``w_bits[P, L]``, ``a_bits[P, La]``, ``keep[P]``) to an
:class:`Evaluator`, which returns top-1 / top-5 accuracy and the mean cross-entropy per
member. The search MINIMISES, so accuracy enters its objectives as error ``1 - top1``;
a member whose logits are not finite gets NaN in all three fields, which the search
must treat as invalid (it never raises).

The quantization itself is injected: a :class:`~nemo_jax._src.schemes.QuantScheme`
(NEMO's calibrated PTQ of one checkpoint, or EMOMC's pre-pruned library) says how a
member's configuration becomes kernels and an activation quantizer
(``docs/DESIGN.md``). The float reference is the FP32 configuration (all bit-widths
32, keep 1) through the same evaluator (:meth:`Evaluator.evaluate_float`).

Evaluation layout (per configuration):
  1. the scheme prunes / selects and fake-quantizes the kernels ONCE per configuration;
  2. the evaluation images, preprocessed once and resident on device as
     ``[num_batches, batch, H, W, C]``, are scanned (``lax.scan``) through the model,
     whose layer inputs the scheme's activation quantizer handles (``a_bits``);
  3. correct-top-1/top-5 counts, the summed loss and a non-finite flag accumulate.

Over the population (strategy, chosen per backend, overridable):
  * ``"map"``: ``lax.map`` over members. Default on CPU, where ``vmap`` over
    per-member conv kernels lowers to grouped convolutions that XLA:CPU runs ~12x
    slower (measured: ``docs/DESIGN.md``; re-measured by ``benchmarks/evaluate.py``).
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

import collections
import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from nemo_jax._src import distributed
from nemo_jax._src import quant
from nemo_jax._src.qconfig import QuantConfig, validate_configs
from nemo_jax._src.layers import QContext
from nemo_jax._src.models import trace_quantizers
from nemo_jax._src import schemes
from nemo_jax._src.schemes import QuantScheme

STRATEGIES = ("auto", "vmap", "map", "chunked_vmap")
ACTIVATION_FACTOR = 4
DEFAULT_MEMORY_BUDGET = 4 * 2**30
DEFAULT_POPULATION_PAD = 8


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


def _add_stats(total, stats):
  """Sums host stats tuples (None is the empty sum)."""
  return stats if total is None else tuple(a + b for a, b in zip(total, stats))


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


def _add_block(totals, item, population: int, on_block):
  stats, count = item
  totals = _add_stats(totals, _host_stats(stats, population))
  if on_block is not None:
    on_block(count)
  return totals


_NO_STATS = (jnp.int32(0), jnp.int32(0), jnp.float32(0.0), jnp.int32(0))
"""The statistics of a padding slot (never read: padding is sliced off)."""


def _host_stats(stats, population: int | None = None):
  """Device ``(top1, topk, loss, bad)`` per member -> host int64 / float64 ``[P]``."""
  out = [np.asarray(distributed.to_host(s)) for s in stats]
  if population is not None:
    out = [v[:population] for v in out]
  c1, ck, loss, bad = out
  return (c1.astype(np.int64), ck.astype(np.int64), loss.astype(np.float64),
          bad.astype(np.int64))


def _finalize(stats, num_images: int, population: int | None = None,
              on_host: bool = False) -> EvalResult:
  """Host side: counts -> fractions (float64 division, then float32); NaN if non-finite."""
  c1, ck, loss, bad = stats if on_host else _host_stats(stats, population)
  invalid = bad > 0
  def frac(v):
    return np.where(invalid, np.nan, np.asarray(v, np.float64) / num_images).astype(np.float32)
  return EvalResult(top1=frac(c1), top5=frac(ck), loss=frac(loss))


class Evaluator:
  """Evaluates populations of configurations of one (model, variables, scheme, data).

  Created once per search: the scheme's per-model data is prepared and the images are
  preprocessed and moved to the device(s) here, and each padded population size
  compiles once. NEMO and EMOMC are two schemes of this class
  (:mod:`nemo_jax._src.schemes`).

  Args:
    model: zoo model (``__call__(x, ctx, train)``).
    variables: what ``scheme.prepare`` takes: the float variables (``schemes.ptq``) or
      the library entries stacked ``[K, ...]`` (``schemes.library``).
    scheme: a :class:`~nemo_jax._src.schemes.QuantScheme`.
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
    memory_fraction: fraction of free device memory the vmap chunks may use.

  The number of classes is read off the model's output; top-5 uses
  ``k = min(5, num_classes)``.
  """

  def __init__(self, model: nn.Module, variables, scheme: QuantScheme, images, labels,
               batch_size: int = 256, population_pad: int | None = None,
               strategy: str = "auto", chunk_size: int | None = None,
               mesh: Mesh | None = None, preprocess: Callable | None = None,
               memory_fraction: float = 0.5):
    if not isinstance(scheme, QuantScheme):
      raise ValueError(f"scheme: got {type(scheme).__name__}; allowed: a QuantScheme "
                       "(nemo_jax.evaluation.ptq_scheme / library_scheme)")
    if strategy not in STRATEGIES:
      raise ValueError(f"strategy={strategy!r} is invalid; allowed: {STRATEGIES}")
    if population_pad is not None and (not isinstance(population_pad, int) or population_pad < 1):
      raise ValueError(f"population_pad={population_pad!r} is invalid; allowed: None or a "
                       "positive integer")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
      raise ValueError(f"chunk_size={chunk_size!r} is invalid; allowed: None or a positive "
                       "integer")
    if not 0 < memory_fraction <= 1:
      raise ValueError(f"memory_fraction={memory_fraction!r} is invalid; allowed: (0, 1]")
    if preprocess is not None:
      images = preprocess(images)
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    if images.ndim != 4 or len(images) < 1:
      raise ValueError(f"images: shape {images.shape}; allowed: [N, H, W, C] with N >= 1")
    if labels.shape != (len(images),):
      raise ValueError(f"labels: shape {labels.shape}; allowed: [{len(images)}] (one per image)")

    self.model = model
    self.scheme = scheme
    self.mesh = distributed.population_mesh() if mesh is None else mesh
    if self.mesh.axis_names != (distributed.POP_AXIS,):
      raise ValueError(f"mesh: axis names {self.mesh.axis_names}; allowed: "
                       f"({distributed.POP_AXIS!r},)")
    self.num_devices = self.mesh.devices.size
    self.platform = self.mesh.devices.flat[0].platform
    self.strategy = default_strategy(self.platform) if strategy == "auto" else strategy
    self.population_pad = population_pad
    self.num_images = len(images)
    self.input_shape = tuple(images.shape[1:])

    prepared = scheme.prepare(model, variables, self.input_shape)
    template = scheme.variables_template(prepared)
    self.layers, self.activations = trace_quantizers(model, self.input_shape, template,
                                                     scheme.spec.placement)
    self.num_layers = len(self.layers)
    self.num_act_quantizers = len(self.activations)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, None, train=False), template,
                         jax.ShapeDtypeStruct((1, *self.input_shape), jnp.float32))
    self.num_classes = int(out.shape[-1])
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f"labels: values in [{labels.min()}, {labels.max()}]; allowed: "
                       f"0..{self.num_classes - 1}")
    self.top_k = min(5, self.num_classes)

    # Balanced image batches, zero-padded and masked: [num_batches, batch, ...].
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r} is invalid; allowed: a positive integer")
    num_batches = math.ceil(self.num_images / batch_size)
    self.batch_size = math.ceil(self.num_images / num_batches)
    total = num_batches * self.batch_size
    pad = total - self.num_images
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
    labels = np.concatenate([labels.astype(np.int32), np.zeros((pad,), np.int32)])
    mask = np.arange(total) < self.num_images
    shape = (num_batches, self.batch_size)
    self._num_batches = num_batches

    self.num_weights = sum(info.weights for info in self.layers)
    self.peak_activation = max(
        info.in_hw[0] * info.in_hw[1] * info.in_channels
        + info.out_hw[0] * info.out_hw[1] * info.out_channels for info in self.layers)
    self.member_bytes = member_bytes(self.num_weights, self.peak_activation, self.batch_size)
    self.memory_budget = memory_budget(self.mesh.devices.flat[0], memory_fraction)
    self._chunk_size = chunk_size

    digest = hashlib.sha256()
    for a in (images, labels, mask):
      digest.update(np.ascontiguousarray(a).tobytes())
    self.images_fingerprint = digest.hexdigest()[:16]
    """SHA-256 (16 hex) of the resident images, labels and mask (cache keys)."""
    self.prepared = prepared
    """What ``scheme.prepare`` computed (host copy)."""
    replicated = distributed.replicated_sharding(self.mesh)
    self._data = distributed.put_global(
        {"prepared": prepared, "images": images.reshape(*shape, *images.shape[1:]),
         "labels": labels.reshape(shape), "mask": mask.reshape(shape)}, replicated)
    self._compiled: dict[int, Callable] = {}
    self._float_result: EvalResult | None = None

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

  def _member(self, data, config: QuantConfig):
    """Top-1, top-k, loss of one configuration (traced)."""
    apply_fn = member_apply_fn(self.model, self.scheme, data["prepared"], config)
    return _scan_images(apply_fn, data["images"], data["labels"], data["mask"], self.top_k)

  def _build(self, padded: int) -> Callable:
    members_per_device = padded // self.num_devices
    chunk = self.chunk_size_for(members_per_device)
    strategy = self.strategy

    def local(data, configs, live):
      member = partial(self._member, data)
      if strategy == "map":
        # One member after the other: a padding slot skips its work (lax.cond runs one
        # branch), so a population costs its live members, whatever size it is padded to.
        return jax.lax.map(
            lambda a: jax.lax.cond(a[1], member, lambda c: _NO_STATS, a[0]), (configs, live))
      if chunk >= configs.w_bits.shape[0]:
        return jax.vmap(member)(configs)
      return jax.lax.map(member, configs, batch_size=chunk)

    pop = PartitionSpec(distributed.POP_AXIS)
    sharded = jax.shard_map(local, mesh=self.mesh, in_specs=(PartitionSpec(), pop, pop),
                            out_specs=pop, check_vma=False)
    # Replicated outputs: XLA all-gathers the (tiny) results so every host can read them.
    return jax.jit(sharded, out_shardings=distributed.replicated_sharding(self.mesh))

  # -- public --------------------------------------------------------------------------

  def __call__(self, configs: QuantConfig) -> EvalResult:
    """Validates a population (host) and evaluates it.

    The public entry point: bit-widths, keep ratios and shapes are checked and a bad
    value raises ValueError naming it. Inside a search, where configurations come
    from validated choices, :meth:`run` skips the check and keeps them on the device.

    Args:
      configs: ``QuantConfig`` with ``w_bits[P, L]``, ``a_bits[P, La]``, ``keep[P]``
        (a single member without the P axis is accepted and gives P = 1). Every host
        must pass the same population.

    Returns:
      :class:`EvalResult` of float32 ``[P]`` arrays (accuracy as fraction; NaN for
      members with non-finite logits). Minimise ``1 - top1``.
    """
    return self.run(validate_configs(
        configs, self.num_layers, [info.name for info in self.layers], population=True,
        allowed_keep=self.scheme.allowed_keep, num_act_quantizers=self.num_act_quantizers,
        act_names=[a.name for a in self.activations]))

  @property
  def block_images(self) -> int:
    """Images per streamed block in :meth:`run_images` (the resident set's padded size)."""
    return self._num_batches * self.batch_size

  def compiled_sizes(self) -> tuple[int, ...]:
    """Padded population sizes compiled so far (one compilation each)."""
    return tuple(sorted(self._compiled))

  def _prepare_configs(self, configs: QuantConfig, pad_to: int | None):
    """Pads ``configs`` to its compiled size; returns ``(fn, (sharded configs, live
    mask), P)``."""
    population = int(np.shape(configs.w_bits)[0])
    if pad_to is None:
      padded = self.padded_size(population)
    else:
      if pad_to < population or pad_to % self.num_devices:
        raise ValueError(f"pad_to={pad_to!r} is invalid; allowed: a multiple of the "
                         f"{self.num_devices} device(s) >= the {population} members")
      padded = int(pad_to)
    # Padded on the host (a few integers per member): eager device ops would compile
    # once per population size.
    configs = QuantConfig(w_bits=np.asarray(configs.w_bits, np.int32),
                          a_bits=np.asarray(configs.a_bits, np.int32),
                          keep=np.broadcast_to(np.asarray(configs.keep, np.float32),
                                               (population,)))
    if padded > population:
      configs = jax.tree.map(
          lambda v: np.concatenate([v, np.repeat(v[:1], padded - population, axis=0)]),
          configs)
    fn = self._compiled.get(padded)
    if fn is None:
      fn = self._compiled[padded] = self._build(padded)
    live = np.arange(padded) < population
    configs, live = distributed.put_global((configs, live),
                                           distributed.population_sharding(self.mesh))
    return fn, (configs, live), population

  def run(self, configs: QuantConfig, pad_to: int | None = None) -> EvalResult:
    """Evaluates an already validated population ``[P]`` (device arrays stay there).

    Members are padded with copies of member 0 to :meth:`padded_size` (results sliced
    off), so one compilation serves many population sizes; with the ``map`` strategy a
    padding slot costs nothing (it is skipped inside the compiled loop).

    Args:
      configs: the population.
      pad_to: evaluate as exactly this many members (a compiled size shared with
        another call, e.g. :meth:`run_images`); None: :meth:`padded_size`.
    """
    fn, members, population = self._prepare_configs(configs, pad_to)
    return _finalize(fn(self._data, *members), self.num_images, population)

  def run_images(self, configs: QuantConfig, images, labels,
                 preprocess: Callable | None = None, pad_to: int | None = None,
                 prefetch: int = 1, on_block: Callable[[int], None] | None = None
                 ) -> EvalResult:
    """Evaluates a population on OTHER images, streamed in blocks of this evaluator's shape.

    The images are cut into blocks of :attr:`block_images` (the resident set's
    ``[num_batches, batch]``; the last block zero-padded and masked), so every block
    runs the SAME compiled function as :meth:`run` for the padded population size: a
    split of any size adds no compilation. Blocks are read (``images[a:b]``, e.g. a
    lazy file-backed source that decodes on access), preprocessed and moved to the
    device by a background thread ``prefetch`` blocks ahead while the device computes;
    at most two blocks are on the device at a time. Memory (``docs/DESIGN.md``,
    "Streaming evaluation")::

      host   <= (prefetch + 2) * block_images * H * W * C * 4  bytes (float32 blocks)
      device <= 2 * block_images * H * W * C * 4  bytes  (+ the resident set)

    Counts are summed over blocks on the host (exact); the loss sums the per-block
    float32 sums in float64.

    Args:
      configs: validated population ``[P]``.
      images: ``[N, H, W, C]`` array or any object with ``len()`` and ``[a:b]`` slicing
        returning such an array.
      labels: int ``[N]``.
      preprocess: applied to each block (e.g. ``partial(data.preprocess, name)``).
      pad_to: as :meth:`run`.
      prefetch: blocks prepared ahead on the host (>= 1).
      on_block: called with the number of images of every block once it is computed
        (progress).

    Returns:
      :class:`EvalResult` over the N images.
    """
    labels = np.asarray(labels).astype(np.int32)
    n = len(labels)
    if len(images) != n or n < 1:
      raise ValueError(f"images: {len(images)} images for {n} labels; allowed: one label "
                       "per image, N >= 1")
    if labels.min() < 0 or labels.max() >= self.num_classes:
      raise ValueError(f"labels: values in [{labels.min()}, {labels.max()}]; allowed: "
                       f"0..{self.num_classes - 1}")
    if not isinstance(prefetch, int) or prefetch < 1:
      raise ValueError(f"prefetch={prefetch!r} is invalid; allowed: an integer >= 1")
    fn, members, population = self._prepare_configs(configs, pad_to)
    block = self.block_images
    shape = (self._num_batches, self.batch_size)
    replicated = distributed.replicated_sharding(self.mesh)

    def host_block(start):
      x = images[start:start + block]
      if preprocess is not None:
        x = preprocess(x)
      x = np.asarray(x, np.float32)
      if tuple(x.shape[1:]) != self.input_shape:
        raise ValueError(f"images: block shape {x.shape}; allowed: [N, "
                         f"{', '.join(map(str, self.input_shape))}] (the evaluator's)")
      count = len(x)
      pad = block - count
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
      y = np.concatenate([labels[start:start + count], np.zeros((pad,), np.int32)])
      m = np.arange(block) < count
      return {"images": x.reshape(*shape, *x.shape[1:]), "labels": y.reshape(shape),
              "mask": m.reshape(shape)}

    starts = list(range(0, n, block))
    totals = None
    in_flight = []
    with ThreadPoolExecutor(max_workers=1) as pool:
      pending = collections.deque(pool.submit(host_block, s) for s in starts[:prefetch])
      for i in range(len(starts)):
        host = pending.popleft().result()
        if i + prefetch < len(starts):
          pending.append(pool.submit(host_block, starts[i + prefetch]))
        data = dict(distributed.put_global(host, replicated), prepared=self._data["prepared"])
        del host
        in_flight.append((fn(data, *members), min(block, n - starts[i])))
        if len(in_flight) == 2:  # bound the device: wait for the older block
          totals = _add_block(totals, in_flight.pop(0), population, on_block)
      for item in in_flight:
        totals = _add_block(totals, item, population, on_block)
    return _finalize(totals, n, population, on_host=True)

  def evaluate_float(self, cached: bool = True) -> EvalResult:
    """Top-1, top-5 and loss (float32 scalars) of the FP32 configuration.

    All bit-widths 32 and keep 1 through the same scheme: the float model (for a
    library, its dense entry with float32 weights and activations).

    Args:
      cached: return the first result again (False re-runs it, e.g. for timing).
    """
    if self._float_result is None or not cached:
      L = self.num_layers
      fp32 = QuantConfig(w_bits=jnp.full((1, L), quant.FLOAT_BITS, jnp.int32),
                         a_bits=jnp.full((1, self.num_act_quantizers), quant.FLOAT_BITS,
                                         jnp.int32),
                         keep=jnp.ones((1,), jnp.float32))
      result = self.run(fp32)
      self._float_result = EvalResult(*(v[0] for v in result))
    return self._float_result


def member_apply_fn(model: nn.Module, scheme: QuantScheme, prepared, config: QuantConfig
                    ) -> Callable:
  """``x -> logits`` of ONE configuration: the fake-quantized forward pass (traced).

  The scheme quantizes every kernel once per configuration here, not once per image
  batch; the returned function runs the model with the scheme's activation quantizer
  (and its per-layer output correction, if any: bias correction).
  This is the computation the :class:`Evaluator` scores (and ``export.py`` checks the
  exported models against).

  Args:
    model: zoo model.
    scheme: the quantization scheme.
    prepared: ``scheme.prepare(model, variables, input_shape)``.
    config: one member (``w_bits[L]``, ``a_bits[La]``, scalar ``keep``).
  """
  variables, kernels = scheme.member_pruned(prepared, config)
  quantizers = scheme.member_quantizers(prepared, config)
  kernels = schemes.quantize_kernels(scheme, config, kernels, quantizers)
  quantize_input = schemes.member_inputs(scheme, prepared, config, quantizers)
  on_output = (None if scheme.member_outputs is None
               else scheme.member_outputs(prepared, config, kernels))

  def apply_fn(x):
    ctx = QContext(quantize_input=quantize_input, placement=scheme.spec.placement,
                   quantize_kernel=lambda kernel, i: _checked_kernel(kernels, kernel, i),
                   on_output=on_output)
    return model.apply(variables, x, ctx, train=False)

  return apply_fn


def member_logits(model: nn.Module, variables, scheme: QuantScheme, config: QuantConfig,
                  images, input_shape=None, prepared=None) -> np.ndarray:
  """Logits of ONE configuration on ``images`` (preprocessed ``[N, H, W, C]``), host.

  Args:
    model, variables, scheme: as :class:`Evaluator`.
    config: one member (validated by the caller).
    images: preprocessed images.
    input_shape: ``(H, W, C)`` (default: ``images.shape[1:]``).
    prepared: ``scheme.prepare(model, variables, input_shape)`` if already computed.

  Returns:
    float32 ``[N, num_classes]``.
  """
  images = np.asarray(images, np.float32)
  shape = tuple(images.shape[1:]) if input_shape is None else tuple(input_shape)
  if prepared is None:
    prepared = scheme.prepare(model, variables, shape)
  fn = jax.jit(lambda p, c, x: member_apply_fn(model, scheme, p, c)(x))
  return np.asarray(fn(prepared, config, jnp.asarray(images)))


def _checked_kernel(kernels, kernel, i):
  if kernel.shape != kernels[i].shape:
    raise ValueError(f"layer {i}: precomputed kernel shape {kernels[i].shape} != model "
                     f"kernel shape {kernel.shape}")
  return kernels[i]


def evaluate(model: nn.Module, variables, scheme: QuantScheme, configs: QuantConfig,
             images, labels, **kwargs) -> EvalResult:
  """One-shot population evaluation (builds an :class:`Evaluator`; compiles every call).

  In a search build the :class:`Evaluator` once and call it every generation.

  Returns:
    :class:`EvalResult` ``(top1[P], top5[P], loss[P])``; minimise ``1 - top1``.
  """
  return Evaluator(model, variables, scheme, images, labels, **kwargs)(configs)
