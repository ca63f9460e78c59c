"""Calibration tables: post-training calibration precomputed per (layer, bit-width).

Better calibration than NEMO's min / max must not cost anything per evaluated
configuration, so everything that depends on a bit-width is computed ONCE per
(checkpoint, calibration images, settings) for every bit-width the search can choose
(``bit_choices`` and the fixed activation bits) and stored as small tables; a member
looks its rows up by its bits inside jit (a gather: no retrace, no per-config search).
Row 0 of every table is ``minmax`` (the fallback for a bit-width outside the table,
e.g. 32 = float). ``docs/DESIGN.md``, "Quantizer schemes and calibration".

Methods (``CALIBRATIONS``: weights, activations, bias correction):

* ``minmax``: NEMO, no tables (the mean of per-batch min / max; full weight ranges).
* ``percentile``: activation ranges at the ``ACT_PERCENTILE`` percentiles of the
  calibration activations (the same for every bit-width).
* ``mse``: per output channel and bit-width, the weight clip ratio of ``CLIP_GRID``
  minimising the squared quantization error of the kernel; per activation quantizer
  and bit-width, the range ``alpha * [min, max]`` (``alpha`` in ``CLIP_GRID``)
  minimising the squared error on the calibration activations.
* ``output_mse``: as ``mse``, but the weight clip ratio (of ``OUTPUT_GRID``) minimises
  the squared error of each layer's OUTPUT per channel on the float layer inputs of
  ``OUTPUT_IMAGES`` calibration images (every layer at once: each reads its recorded
  float input), not the kernel's own error.
* ``adaround``: layer-wise AdaRound (Nagel et al., 2020) on the ``output_mse`` clip
  ratios: per layer and bit-width, the rounding direction of every weight
  (``floor + {0, 1}``) learned with Adam to reconstruct the layer's output on its float
  inputs (``ADAROUND_IMAGES`` images, ``ADAROUND_STEPS`` steps; rectified sigmoid, the
  rounding regulariser annealed), stored as int8 per (layer, bit, weight); activations
  as ``mse``.
* ``bias_correction`` / ``mse_bias_correction`` / ``output_mse_bias_correction``:
  ``minmax`` / ``mse`` / ``output_mse`` plus analytical
  bias correction: the mean output error of every quantized layer on the (float)
  calibration inputs is added back to its output. The mean input patch of every
  layer is precomputed (``mean_patches``); per member the correction
  ``sum((W_float - W_q) * patch)`` per channel is one multiply-add over the kernel.

Tables are cached as ``.npz`` files next to the calibration cache
(``calibration.cache_dir()``), named by a fingerprint of everything they depend on
(:func:`load_or_compute`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from nemo_jax._src import calibration as calib_lib
from nemo_jax._src import quant
from nemo_jax._src.faults import write_atomic
from nemo_jax._src.layers import QContext
from nemo_jax._src.spec import CALIBRATIONS, QuantSpec

TABLES_FORMAT = "nemo_jax.tables.v1"

CLIP_GRID = tuple(np.round(np.arange(100, 0, -1) / 100.0, 2).tolist())
"""Clip ratios searched by ``mse`` (1.00, 0.99, ..., 0.01; ties go to the larger)."""

OUTPUT_GRID = tuple(np.round(np.arange(20, 0, -1) / 20.0, 2).tolist())
"""Clip ratios searched by ``output_mse`` (1.00, 0.95, ..., 0.05): each costs a forward pass."""

OUTPUT_IMAGES = 64
"""Calibration images ``output_mse`` measures layer outputs on (the first ones)."""

ADAROUND_STEPS = 200
"""Adam steps of layer-wise AdaRound per bit-width (all layers learn at once)."""

ADAROUND_IMAGES = 32
"""Calibration images AdaRound reconstructs layer outputs on (the first ones)."""

ADAROUND_LR = 1e-2
ADAROUND_REG = 0.01
"""AdaRound's rounding regulariser weight (``lambda``; beta annealed 20 -> 2)."""

ACT_PERCENTILE = 99.99
"""``percentile``: the range is ``[P(100 - p), P(p)]`` of the calibration activations."""

SAMPLES_PER_BATCH = 16384
"""Activation values sampled (uniformly, fixed key) per quantizer and calibration batch."""


@flax.struct.dataclass
class CalibrationTables:
  """Per-(layer, bit-width) calibration, looked up inside jit (module docstring).

  Attributes:
    bits: int32 ``[B]`` the tabulated bit-widths; row ``r + 1`` of a table belongs to
      ``bits[r]``, row 0 is ``minmax``.
    w_clip: per layer, float32 ``[B + 1, C]`` (per channel) or ``[B + 1]`` (per
      tensor) weight clip ratios, or None (``minmax`` weights).
    w_up: per layer, int8 ``[B + 1, *kernel]`` learned rounding (0 / 1; row 0 = 2:
      nearest), or None.
    act_lo, act_hi: float32 ``[B + 1, La]`` activation ranges, or None.
    bias: per layer, float32 mean input patch (the kernel's shape), or None (no bias
      correction).
    method: the calibration method (static).
    fingerprint: what the tables were computed from (static).
  """
  bits: Any
  w_clip: Any = None
  act_lo: Any = None
  act_hi: Any = None
  bias: Any = None
  w_up: Any = None
  method: str = flax.struct.field(pytree_node=False, default="minmax")
  fingerprint: str = flax.struct.field(pytree_node=False, default="")

  def check(self, num_layers: int, num_act_quantizers: int) -> None:
    """Raises ValueError if the tables do not belong to a model of these sizes."""
    for name, value, n in (("w_clip", self.w_clip, num_layers),
                           ("bias", self.bias, num_layers), ("w_up", self.w_up, num_layers)):
      if value is not None and len(value) != n:
        raise ValueError(f"tables.{name}: {len(value)} layers, the model has {n}; "
                         "allowed: tables computed for this model")
    if self.act_lo is not None and np.shape(self.act_lo)[-1] != num_act_quantizers:
      raise ValueError(f"tables.act_lo: {np.shape(self.act_lo)[-1]} activation quantizers, "
                       f"the model has {num_act_quantizers}; allowed: tables computed for "
                       "this model and placement")


def table_bits(bit_choices: Sequence[int], extra: Sequence[int] = ()) -> tuple[int, ...]:
  """The bit-widths worth a table row: the choices (and ``extra``) below 32."""
  return tuple(sorted({int(b) for b in tuple(bit_choices) + tuple(extra)
                       if b < quant.FLOAT_BITS}))


def table_row(bits_table, bits):
  """Row of ``bits`` (any shape) in a table: ``1 + index`` in ``bits_table``, 0 if absent."""
  bits = jnp.asarray(bits, jnp.int32)
  hit = bits[..., None] == jnp.asarray(bits_table, jnp.int32)
  rows = jnp.arange(1, hit.shape[-1] + 1, dtype=jnp.int32)
  return jnp.sum(jnp.where(hit, rows, 0), axis=-1)


# --------------------------------------------------------------------------- lookups


def weight_clips(tables: CalibrationTables | None, w_bits, num_layers: int) -> list:
  """Per layer the clip ratio of the member's bits (``None`` entries: no clipping)."""
  if tables is None or tables.w_clip is None:
    return [None] * num_layers
  rows = table_row(tables.bits, w_bits)
  return [tables.w_clip[i][rows[i]] for i in range(num_layers)]


def weight_ups(tables: CalibrationTables | None, w_bits, num_layers: int) -> list:
  """Per layer the learned rounding of the member's bits (``None`` entries: nearest)."""
  if tables is None or tables.w_up is None:
    return [None] * num_layers
  rows = table_row(tables.bits, w_bits)
  return [tables.w_up[i][rows[i]] for i in range(num_layers)]


def act_ranges(tables: CalibrationTables | None, a_bits, lo, hi):
  """The member's activation ranges ``(lo[La], hi[La])`` (``lo, hi``: the minmax ones)."""
  if tables is None or tables.act_lo is None:
    return lo, hi
  rows = table_row(tables.bits, a_bits)
  cols = jnp.arange(rows.shape[-1])
  return tables.act_lo[rows, cols], tables.act_hi[rows, cols]


def bias_correction(tables: CalibrationTables, float_kernels, kernels):
  """``on_output(y, i)`` adding layer ``i``'s mean output error on the calibration data.

  ``delta_i[c] = sum((W_float - W_member)[..., c] * patch_i[..., c])`` (the member's
  pruned + quantized kernel against the float one); the corrected layer's output has
  the float layer's mean over the calibration images and positions.
  """
  deltas = [correction(p, wf, wq) for p, wf, wq in zip(tables.bias, float_kernels, kernels)]
  return lambda y, i: y + deltas[i].astype(y.dtype)


def correction(patch, w_float, w_quant):
  """Per output channel ``sum((w_float - w_quant) * patch)`` over all other axes."""
  axes = tuple(range(w_float.ndim - 1))
  return jnp.sum((w_float - w_quant) * patch, axis=axes)


# --------------------------------------------------------------------------- weights


def mse_weight_clip(w, bits, spec: QuantSpec, grid: Sequence[float] = CLIP_GRID):
  """Per channel (or per tensor) and bit-width, the MSE-optimal clip ratio of ``grid``.

  Args:
    w: kernel, output channels last.
    bits: int ``[B]`` bit-widths.
    spec: the quantizers (``weight_quant``, ``weight_range``).
    grid: candidate ratios, descending (the first minimum wins: ties keep the wider
      range, so a bit-width where clipping cannot help keeps ratio 1).

  Returns:
    float32 ``[B, C]`` (per channel) or ``[B]`` (per tensor).
  """
  w = jnp.asarray(w, jnp.float32)
  mode, weight_range = spec.weight_quant, spec.weight_range
  axes = tuple(range(w.ndim - 1)) if mode.endswith("per_channel") else None
  grid = jnp.asarray(grid, jnp.float32)

  @jax.jit
  def run(w, bits, grid):
    def per_bit(b):
      def err(a):
        q = quant.quantize_weight(w, b, mode, weight_range, clip=a)
        return jnp.sum(jnp.square(q - w), axis=axes)
      errors = jax.lax.map(err, grid)            # [G, C] or [G]
      return grid[jnp.argmin(errors, axis=0)]
    return jax.lax.map(per_bit, bits)

  return run(w, jnp.asarray(bits, jnp.int32), grid)


def _record_layers(model, variables, x, placement):
  """Every activation quantizer's float tensor and every layer's float output."""
  @jax.jit
  def record(variables, x):
    ins, outs = {}, {}

    def on_input(v, q):
      ins[q] = v
      return v

    def on_output(y, i):
      outs[i] = y
      return y

    model.apply(variables, x, QContext(quantize_input=on_input, on_output=on_output,
                                       placement=placement), train=False)
    return [ins[q] for q in range(len(ins))], [outs[i] for i in range(len(outs))]
  return record(variables, x)


def output_mse_weight_clip(model: nn.Module, variables, images, bits, spec: QuantSpec,
                           grid: Sequence[float] = OUTPUT_GRID, on_bit=None):
  """Per layer, channel and bit-width, the clip ratio minimising the layer's output error.

  Every layer reads its recorded float input (so the layers are independent and are
  scored in one forward pass per candidate); the error of output channel ``c`` is
  ``mean((y_c(W_q) - y_c(W_float))^2)`` over images and positions. Per tensor modes sum
  it over channels.

  Args:
    model, variables: the float model.
    images: calibration images ``[N, H, W, C]`` (one batch).
    bits: int ``[B]`` bit-widths.
    spec: the quantizers (``weight_quant``, ``weight_range``, ``placement``).
    grid: candidate ratios, descending (ties keep the wider range).
    on_bit: called after each bit-width (progress).

  Returns:
    Per layer float32 ``[B, C]`` (per channel) or ``[B]`` (per tensor).
  """
  x = jnp.asarray(np.asarray(images, np.float32))
  mode, weight_range, placement = spec.weight_quant, spec.weight_range, spec.placement
  per_channel = mode.endswith("per_channel")
  ins, outs = _record_layers(model, variables, x, placement)

  @jax.jit
  def errors(variables, ins, outs, x, b, grid):
    def one(a):
      errs = {}

      def on_output(y, i):
        e = jnp.mean(jnp.square(y - outs[i]).astype(jnp.float32),
                     axis=tuple(range(y.ndim - 1)))
        errs[i] = e if per_channel else jnp.sum(e)
        return y

      ctx = QContext(quantize_input=lambda v, q: ins[q],
                     quantize_kernel=lambda k, i: quant.quantize_weight(k, b, mode,
                                                                        weight_range, a),
                     on_output=on_output, placement=placement)
      model.apply(variables, x, ctx, train=False)
      return [errs[i] for i in range(len(errs))]
    per_layer = jax.lax.map(one, grid)                   # per layer [G, C] or [G]
    return [grid[jnp.argmin(e, axis=0)] for e in per_layer]

  grid = jnp.asarray(grid, jnp.float32)
  per_bit = []
  for b in np.asarray(bits).tolist():
    per_bit.append(jax.device_get(errors(variables, ins, outs, x, jnp.int32(b), grid)))
    if on_bit is not None:
      on_bit(1)
  return [np.stack([pb[i] for pb in per_bit]).astype(np.float32)
          for i in range(len(per_bit[0]))]


_ZETA, _GAMMA = 1.1, -0.1   # AdaRound's rectified sigmoid stretch


def _rectified_sigmoid(v):
  return jnp.clip(jax.nn.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def adaround(model: nn.Module, variables, images, bits, spec: QuantSpec, clips=None,
             steps: int = ADAROUND_STEPS, lr: float = ADAROUND_LR, reg: float = ADAROUND_REG,
             on_bit=None):
  """Layer-wise AdaRound: per layer and bit-width, each weight's rounding direction.

  For bit-width ``b`` every layer's soft kernel is
  ``(clip(floor(w / s) + h(V) + zp, qmin, qmax) - zp) * s`` (``quant.weight_grid`` with
  the layer's clip ratio), ``h`` the rectified sigmoid; ``V`` starts at the fractional
  part (``h(V) = w / s - floor(w / s)``) and Adam minimises, summed over layers, the
  normalised output error ``mean((y(W_soft) - y)^2) / mean(y^2)`` on the layer's
  recorded float input plus ``reg * mean(1 - |2h - 1|^beta)`` (off for the first 20%
  of the steps, then ``beta`` from 20 to 2). Layers read their float inputs, so they are
  independent and learn in one pass. A layer keeps its learned rounding only if the
  hard (0 / 1) rounding reconstructs its output better than nearest rounding on these
  images (the short schedule can leave it worse); 1-bit symmetric layers keep nearest.

  Args:
    model, variables: the float model.
    images: calibration images (one batch).
    bits: the bit-widths ``[B]``.
    spec: the quantizers (``weight_quant``, ``weight_range``, ``placement``).
    clips: per layer ``[B, C]`` / ``[B]`` clip ratios, or None (min / max ranges).
    steps, lr, reg: Adam steps, learning rate, regulariser weight.
    on_bit: called after each bit-width (progress).

  Returns:
    Per layer int8 ``[B, *kernel]``: 1 = round up, 0 = round down (2 = nearest).
  """
  x = jnp.asarray(np.asarray(images, np.float32))
  mode, weight_range, placement = spec.weight_quant, spec.weight_range, spec.placement
  ins, outs = _record_layers(model, variables, x, placement)
  kernels = float_kernels(model, variables, x.shape[1:], placement)
  warmup = int(0.2 * steps)
  opt = optax.adam(lr)

  def grids(b, j):
    out = []
    for i, k in enumerate(kernels):
      clip = None if clips is None else jnp.asarray(clips[i])[j]
      out.append(quant.weight_grid(k, b, mode, weight_range, clip))
    return out

  @jax.jit
  def learn(variables, ins, outs, x, b, j):
    g = grids(b, j)
    floors = [jnp.floor(k / s) for k, (s, _, _, _) in zip(kernels, g)]
    rest = [jnp.clip(k / s - f, 0.01, 0.99) for k, (s, _, _, _), f in zip(kernels, g, floors)]
    v0 = [-jnp.log((_ZETA - _GAMMA) / (r - _GAMMA) - 1.0) for r in rest]

    def loss(v, beta, on):
      errs = []

      def quantize_kernel(k, i):
        s, zp, qmin, qmax = g[i]
        q = jnp.clip(floors[i] + _rectified_sigmoid(v[i]) + zp, qmin, qmax)
        return ((q - zp) * s).astype(k.dtype)

      def on_output(y, i):
        errs.append(jnp.mean(jnp.square(y - outs[i])) / (jnp.mean(jnp.square(outs[i]))
                                                           + 1e-12))
        return y

      ctx = QContext(quantize_input=lambda t, q: ins[q], quantize_kernel=quantize_kernel,
                     on_output=on_output, placement=placement)
      model.apply(variables, x, ctx, train=False)
      round_reg = sum(jnp.mean(1.0 - jnp.abs(2.0 * _rectified_sigmoid(vi) - 1.0) ** beta)
                      for vi in v)
      return sum(errs) + on * reg * round_reg

    def step(carry, t):
      v, state = carry
      frac = jnp.clip((t - warmup) / max(steps - warmup, 1), 0.0, 1.0)
      beta = 20.0 + (2.0 - 20.0) * frac
      grads = jax.grad(loss)(v, beta, (t >= warmup).astype(jnp.float32))
      updates, state = opt.update(grads, state, v)
      return (optax.apply_updates(v, updates), state), None

    (v, _), _ = jax.lax.scan(step, (v0, opt.init(v0)), jnp.arange(steps))
    ups = [(vi >= 0).astype(jnp.int8) for vi in v]
    # Keep a layer's learned rounding only where it beats nearest rounding (hard).
    clip_j = [None if clips is None else jnp.asarray(clips[i])[j] for i in range(len(kernels))]
    learned = _hard_errors(model, variables, ins, outs, x, b, clip_j, ups, spec)
    nearest = _hard_errors(model, variables, ins, outs, x, b, clip_j, None, spec)
    return [jnp.where(l < n, u, jnp.int8(2)) for u, l, n in zip(ups, learned, nearest)]

  per_bit = []
  for j, b in enumerate(np.asarray(bits).tolist()):
    if b <= 1 and mode.startswith("symmetric"):
      per_bit.append([np.full(k.shape, 2, np.int8) for k in kernels])
    else:
      per_bit.append(jax.device_get(learn(variables, ins, outs, x, jnp.int32(b), j)))
    if on_bit is not None:
      on_bit(1)
  return [np.stack([pb[i] for pb in per_bit]).astype(np.int8) for i in range(len(kernels))]


def _hard_errors(model, variables, ins, outs, x, bits, clips, ups, spec: QuantSpec):
  """Per layer ``mean((y(W_q) - y)^2)`` with every layer on its recorded float input."""
  errs = {}

  def quantize_kernel(k, i):
    up = None if ups is None else ups[i]
    return quant.quantize_weight(k, bits, spec.weight_quant, spec.weight_range, clips[i], up)

  def on_output(y, i):
    errs[i] = jnp.mean(jnp.square(y - outs[i]))
    return y

  ctx = QContext(quantize_input=lambda t, q: ins[q], quantize_kernel=quantize_kernel,
                 on_output=on_output, placement=spec.placement)
  model.apply(variables, x, ctx, train=False)
  return [errs[i] for i in range(len(errs))]


def reconstruction_errors(model: nn.Module, variables, images, bits: int, spec: QuantSpec,
                          clips=None, ups=None):
  """Per layer ``mean((y(W_q) - y)^2)`` on its float input (``clips`` / ``ups``: per layer,
  this bit-width's clip ratio / rounding, or None)."""
  x = jnp.asarray(np.asarray(images, np.float32))
  ins, outs = _record_layers(model, variables, x, spec.placement)
  n = len(outs)
  errs = _hard_errors(model, variables, ins, outs, x, bits,
                      [None] * n if clips is None else clips, ups, spec)
  return [float(e) for e in errs]


# --------------------------------------------------------------------------- activations


def activation_samples(model: nn.Module, variables, images, batch_size: int,
                       num_batches: int | None = None, placement: str = "conv_inputs",
                       samples_per_batch: int = SAMPLES_PER_BATCH):
  """Samples of every activation quantizer's float tensor, and its overall min / max.

  Returns:
    ``(samples, lo, hi)``: per quantizer a float32 array of sampled values (uniform with
    replacement, fixed keys, ``samples_per_batch`` per batch or the whole tensor if
    smaller), and float32 ``[La]`` minimum / maximum over all calibration batches.
  """
  images = np.asarray(images, np.float32)
  slices = calib_lib._batch_slices(len(images), batch_size, num_batches)

  @jax.jit
  def observe(variables, x, key):
    found = {}

    def fn(x, q):
      flat = x.reshape(-1).astype(jnp.float32)
      if flat.size > samples_per_batch:
        idx = jax.random.randint(jax.random.fold_in(key, q), (samples_per_batch,), 0,
                                 flat.size)
        sample = flat[idx]
      else:
        sample = flat
      found[q] = (sample, jnp.min(flat), jnp.max(flat))
      return x

    model.apply(variables, x, QContext(quantize_input=fn, placement=placement), train=False)
    return [found[q] for q in range(len(found))]

  per_batch = [observe(variables, jnp.asarray(images[sl]), jax.random.key(b))
               for b, sl in enumerate(slices)]
  per_batch = jax.device_get(per_batch)
  num = len(per_batch[0])
  samples = [np.concatenate([b[q][0] for b in per_batch]) for q in range(num)]
  lo = np.asarray([min(float(b[q][1]) for b in per_batch) for q in range(num)], np.float32)
  hi = np.asarray([max(float(b[q][2]) for b in per_batch) for q in range(num)], np.float32)
  return samples, lo, hi


def mse_act_range(samples, lo, hi, bits, act_quant: str = "affine",
                  grid: Sequence[float] = CLIP_GRID):
  """Per bit-width, the range ``alpha * [lo, hi]`` (``alpha`` in ``grid``) minimising the
  mean squared quantization error of ``samples``.

  Returns:
    float32 ``(lo[B], hi[B])``.
  """
  grid = jnp.asarray(grid, jnp.float32)

  @jax.jit
  def run(s, lo, hi, bits, grid):
    def per_bit(b):
      def err(a):
        q = quant.quantize_affine(s, b, a * lo, a * hi, clipped_ste=False,
                                  act_quant=act_quant)
        return jnp.mean(jnp.square(q - s))
      a = grid[jnp.argmin(jax.lax.map(err, grid))]
      return a * lo, a * hi
    return jax.lax.map(per_bit, bits)

  return run(jnp.asarray(samples, jnp.float32), jnp.float32(lo), jnp.float32(hi),
             jnp.asarray(bits, jnp.int32), grid)


def percentile_range(samples, percentile: float = ACT_PERCENTILE):
  """``(P(100 - p), P(p))`` of the samples (float32 scalars)."""
  s = np.asarray(samples, np.float64)
  return (np.float32(np.percentile(s, 100.0 - percentile)),
          np.float32(np.percentile(s, percentile)))


# --------------------------------------------------------------------------- bias


def float_kernels(model: nn.Module, variables, input_shape, placement: str = "conv_inputs"):
  """Every quantized layer's float kernel (float32), execution order (one eager call)."""
  found = {}

  def grab(kernel, i):
    found[i] = jnp.asarray(kernel, jnp.float32)
    return kernel

  x = jnp.zeros((1, *tuple(input_shape)), jnp.float32)
  model.apply(variables, x, QContext(quantize_kernel=grab, placement=placement), train=False)
  return [found[i] for i in range(len(found))]


def mean_patches(model: nn.Module, variables, images, batch_size: int,
                 num_batches: int | None = None, placement: str = "conv_inputs"):
  """Per quantized layer, the mean input patch on the calibration images (float model).

  ``patch_i[..., c]`` has layer ``i``'s kernel shape: the mean, over images and output
  positions, of the input value each kernel weight multiplies for output channel ``c``
  (zeros of the padding included), so the mean output of the layer with kernel ``W`` is
  ``sum(W * patch)`` per channel plus its bias. Computed as the gradient of the summed
  per-channel output means with respect to the kernels, with every layer input held
  constant (``stop_gradient``), so no other layer contributes.

  Returns:
    A list of float32 arrays (kernel shapes), execution order.
  """
  images = np.asarray(images, np.float32)
  slices = calib_lib._batch_slices(len(images), batch_size, num_batches)
  kernels = float_kernels(model, variables, images.shape[1:], placement)

  def total(deltas, variables, x):
    means = []

    def on_output(y, i):
      means.append(jnp.sum(jnp.mean(y.astype(jnp.float32), axis=tuple(range(y.ndim - 1)))))
      return y

    ctx = QContext(quantize_input=lambda x, q: jax.lax.stop_gradient(x),
                   quantize_kernel=lambda k, i: k + deltas[i].astype(k.dtype),
                   on_output=on_output, placement=placement)
    model.apply(variables, x, ctx, train=False)
    return sum(means)

  grad = jax.jit(jax.grad(total))
  zeros = [jnp.zeros_like(k) for k in kernels]
  acc = [np.zeros(k.shape, np.float64) for k in kernels]
  for sl in slices:
    g = grad(zeros, variables, jnp.asarray(images[sl]))
    n = sl.stop - sl.start
    acc = [a + n * np.asarray(x, np.float64) for a, x in zip(acc, g)]
  total_images = sum(sl.stop - sl.start for sl in slices)
  return [jnp.asarray(a / total_images, jnp.float32) for a in acc]


# --------------------------------------------------------------------------- build / cache


def compute_tables(spec: QuantSpec, model: nn.Module, variables, images, bits: Sequence[int],
                   calibration: calib_lib.Calibration | None, batch_size: int,
                   num_batches: int | None = None,
                   progress: bool = False) -> CalibrationTables | None:
  """The tables of ``spec.calibration`` (None for ``minmax``).

  Args:
    spec: the quantizers the tables are for (``calibration`` names the method; integer
      activations get activation tables).
    model, variables: the float model.
    images: preprocessed calibration images.
    bits: the bit-widths to tabulate (:func:`table_bits`).
    calibration: the ``minmax`` calibration (row 0 of the activation tables); required
      with integer activations.
    batch_size, num_batches: as ``calibration.calibrate``.
    progress: a progress bar over the steps (weights per bit-width, activations, bias).
  """
  method, placement, activations = spec.calibration, spec.placement, spec.int_activations
  w_method, a_method, bias = CALIBRATIONS[method]
  if method == "minmax":
    return None
  steps = ((len(table_bits(bits)) if w_method != "minmax" else 0)
           + (len(table_bits(bits)) if w_method == "adaround" else 0)
           + (1 if activations and a_method != "minmax" else 0) + (1 if bias else 0))
  bar = tqdm(total=steps, disable=not progress, desc=f"calibration tables ({method})",
             unit="step")
  bits = table_bits(bits)
  bits_arr = jnp.asarray(bits, jnp.int32)
  images = np.asarray(images, np.float32)
  w_clip = act_lo = act_hi = patches = None
  if w_method == "mse":
    clips = [np.asarray(mse_weight_clip(k, bits_arr, spec))
             for k in float_kernels(model, variables, images.shape[1:], placement)]
    bar.update(len(bits))
  elif w_method in ("output_mse", "adaround"):
    clips = output_mse_weight_clip(model, variables, images[:OUTPUT_IMAGES], bits_arr, spec,
                                   on_bit=bar.update)
  if w_method != "minmax":
    w_clip = [jnp.asarray(np.concatenate([np.ones_like(c[:1]), c]), jnp.float32)
              for c in clips]
  w_up = None
  if w_method == "adaround":
    ups = adaround(model, variables, images[:ADAROUND_IMAGES], bits_arr, spec, clips,
                   on_bit=bar.update)
    w_up = [jnp.asarray(np.concatenate([np.full_like(u[:1], 2), u]), jnp.int8) for u in ups]
  if activations and a_method != "minmax":
    if calibration is None:
      raise ValueError(f"calibration: required for calibration={method!r} with integer "
                       "activations; allowed: a Calibration")
    samples, lo, hi = activation_samples(model, variables, images, batch_size, num_batches,
                                         placement)
    rows_lo = [np.asarray(calibration.lo, np.float32)]
    rows_hi = [np.asarray(calibration.hi, np.float32)]
    if a_method == "percentile":
      pr = np.asarray([percentile_range(s) for s in samples], np.float32)
      rows_lo += [pr[:, 0]] * len(bits)
      rows_hi += [pr[:, 1]] * len(bits)
    else:
      per_q = [jax.device_get(mse_act_range(s, lo[q], hi[q], bits_arr, spec.act_quant))
               for q, s in enumerate(samples)]
      rows_lo += [np.asarray([r[0][j] for r in per_q], np.float32) for j in range(len(bits))]
      rows_hi += [np.asarray([r[1][j] for r in per_q], np.float32) for j in range(len(bits))]
    act_lo = jnp.asarray(np.stack(rows_lo), jnp.float32)
    act_hi = jnp.asarray(np.stack(rows_hi), jnp.float32)
    bar.update(1)
  if bias:
    patches = mean_patches(model, variables, images, batch_size, num_batches, placement)
    bar.update(1)
  bar.close()
  return CalibrationTables(bits=bits_arr, w_clip=w_clip, act_lo=act_lo, act_hi=act_hi,
                           bias=patches, w_up=w_up, method=method)


def tables_fingerprint(spec: QuantSpec, variables, images, bits: Sequence[int],
                       batch_size: int, num_batches: int | None) -> str:
  """SHA-256 (16 hex) of everything the tables depend on (see ``calibration.fingerprint``)."""
  base = calib_lib.fingerprint(variables, images, batch_size, num_batches, spec.placement)
  settings = (TABLES_FORMAT, spec.calibration, tuple(table_bits(bits)), spec.weight_quant,
              spec.resolved_weight_range, spec.act_quant, spec.int_activations, CLIP_GRID,
              ACT_PERCENTILE, SAMPLES_PER_BATCH, OUTPUT_GRID, OUTPUT_IMAGES, ADAROUND_STEPS,
              ADAROUND_IMAGES, ADAROUND_LR, ADAROUND_REG)
  return hashlib.sha256(f"{base}|{settings!r}".encode()).hexdigest()[:16]


def save_tables(path: str | os.PathLike, tables: CalibrationTables) -> None:
  """Writes tables as ``.npz`` (atomic rename)."""
  arrays = {"format": np.asarray(TABLES_FORMAT), "method": np.asarray(tables.method),
            "fingerprint": np.asarray(tables.fingerprint), "bits": np.asarray(tables.bits)}
  for name in ("w_clip", "bias", "w_up"):
    value = getattr(tables, name)
    if value is not None:
      arrays[f"{name}/count"] = np.asarray(len(value))
      arrays.update({f"{name}/{i}": np.asarray(v) for i, v in enumerate(value)})
  if tables.act_lo is not None:
    arrays["act_lo"] = np.asarray(tables.act_lo)
    arrays["act_hi"] = np.asarray(tables.act_hi)
  write_atomic(os.fspath(path), lambda f: np.savez(f, **arrays))


def load_tables(path: str | os.PathLike) -> CalibrationTables:
  """Reads a file written by :func:`save_tables`.

  Raises:
    ValueError: not a tables file.
  """
  try:
    with np.load(path) as f:
      data = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"tables file {path}: unreadable ({e})") from None
  if str(data.get("format", "")) != TABLES_FORMAT:
    raise ValueError(f"tables file {path}: format={str(data.get('format'))!r}; allowed: "
                     f"{TABLES_FORMAT!r}")

  def listed(name):
    if f"{name}/count" not in data:
      return None
    return [jnp.asarray(data[f"{name}/{i}"]) for i in range(int(data[f"{name}/count"]))]

  return CalibrationTables(
      bits=jnp.asarray(data["bits"], jnp.int32), w_clip=listed("w_clip"),
      act_lo=jnp.asarray(data["act_lo"]) if "act_lo" in data else None,
      act_hi=jnp.asarray(data["act_hi"]) if "act_hi" in data else None,
      bias=listed("bias"), w_up=listed("w_up"), method=str(data["method"]), fingerprint=str(data["fingerprint"]))


def load_or_compute(path: str | os.PathLike | None, spec: QuantSpec, model: nn.Module,
                    variables, images, bits: Sequence[int], calibration, batch_size: int,
                    num_batches: int | None = None,
                    progress: bool = False) -> CalibrationTables | None:
  """The cached tables if their fingerprint matches, else new ones (written to the cache).

  Args:
    path: the cache file; None: ``calibration.cache_dir()/<fingerprint>.tables.npz``.
    Others: as :func:`compute_tables`.

  Returns:
    The tables (None for ``minmax``). A read-only cache is skipped silently.
  """
  if spec.calibration == "minmax":
    return None
  images = np.asarray(images, np.float32)
  expected = tables_fingerprint(spec, variables, images, bits, batch_size, num_batches)
  if path is None:
    path = os.path.join(calib_lib.cache_dir(), f"{expected}.tables.npz")
  return calib_lib.cached_result(
      path, expected, load_tables, save_tables,
      lambda: compute_tables(spec, model, variables, images, bits, calibration, batch_size,
                             num_batches, progress).replace(fingerprint=expected))
