"""Cost formulas: BOPs, memory, EMOMC energy and size as pure functions of a config batch.

Every cost is minimised by the search (lower is better). Inputs are a population
``QuantConfig`` with ``w_bits[P, L]``, ``a_bits[P, La]`` (int, 32 = float) and
``keep[P]`` (fraction of weights kept); outputs are ``float32 [P]`` arrays. A workload's
static per-layer numbers are folded into the compiled function as constants, so there is
one compile per (workload, P). Every built-in cost is an affine function of a few
per-config sums, so the batch costs two small matmuls (:class:`_Constants`); on CPU the
batch is processed in cache-sized blocks (:func:`map_chunks`), ~3 million ResNet-50
configs/s for all objectives on 2 cores (``benchmarks/costs.py``).

Definitions (per image; ``b`` = weight bits, ``a`` = input-activation bits, ``p`` = keep)

* ``params``: every learnable parameter of the model (``Workload.total_params``).
* ``macs``: conv + dense multiply-accumulates (dense, pruning ignored).
* ``bops = sum_l macs_l * b_l * a_in(l)``; FP32 is ``32 x 32`` (NEMO / AIMET / HAWQ-V3);
  ``bops_ratio = bops / (1024 * macs)``. ``sparse_bops = p * bops`` counts only the MACs
  of kept weights (an idealised sparse engine).
* ``weight_bits = sum_l weights_l * b_l``: dense storage, pruned zeros still stored.
  ``sparse_weight_bits = p * weight_bits`` (values of kept weights only, no index cost;
  see the EMOMC CSR/COO sizes for index costs).
* ``model_bits = weight_bits + 32 * (total_params - sum_l weights_l)``: biases and
  BatchNorm parameters are never quantized and stay FP32.
  ``model_ratio = model_bits / (32 * total_params)`` (NEMO's memory objective) and
  ``weight_ratio = weight_bits / (32 * sum_l weights_l)`` (quantized weights only).
Activation bits are per activation quantizer ``q`` (``a_bits[q]``); layer ``l`` reads
quantizer ``in(l) = Workload.input_quantizer[l]`` (``conv_inputs`` placement:
``in(l) = l``), so ``bops = sum_l macs_l * b_l * a_in(l)`` counts the bits of the tensor a
layer actually reads.

* ``act_peak_bits = max_q elems_q * a_q``: the largest quantized activation (the
  activation buffer a layer-by-layer accelerator must hold for one image);
  ``act_total_bits = sum_q elems_q * a_q`` (activation traffic per image).
* EMOMC model size in KB (bits / 8192), per layer with ``N = weights_l``, summed:
  Normal ``N * round(b)``, CSR ``N * round(b + 3) * p``, COO ``N * round(b + log2 N) * p``.
  Weights only (EMOMC counts no biases). Bit-widths are integers here, so
  ``round(b + log2 N) = b + round(log2 N)`` exactly (``log2 N`` never ends in .5).
* EMOMC energy (units of 0.01 mJ = relative total / 1e6) for the dataflows
  ``X|Y``, ``IC|OC``, ``Fx|Fy``, ``X|Fx``, exactly EMOMC's formulas (Wang et al. 2021): per conv
  layer with ``k x k`` kernel (``k*k = k_h*k_w``, ``k = k_w`` for the ``Fx`` loop),
  ``ci = C_in / groups``, ``co = C_out / groups``, ``O = H_out * W_out``, ``M`` = MACs and
  counts ``[mac, ifmap reads, weight reads, ofmap writes, psum reads]``; dense layers use
  output-stationary counts ``[M, M, M, C_out * positions, 0]`` in every dataflow (positions
  = tokens of a dense layer on ``[N, T, C]``, 1 for ``[N, C]``: EMOMC's ``C_out``). EMOMC keeps
  activations in FP16, so its energy ignores ``a_bits``.

The named objectives, their registry and the compiled entry points are in
``registry.py``; the per-layer report of one config in ``report.py``.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.quant import FLOAT_BITS
from nemo_jax._src.workload import Workload

DATAFLOWS = ("X|Y", "IC|OC", "Fx|Fy", "X|Fx")
"""EMOMC dataflows (which loop pair is unrolled spatially)."""

CODINGS = ("normal", "csr", "coo")
"""EMOMC weight coding schemes."""

# EMOMC's per-operation energy costs (relative units).
E_MAC, E_READ, E_WRITE = 0.102, 0.728, 0.447
ENERGY_SCALE = 1e6          # relative total / 1e6 = units of 0.01 mJ
CSR_INDEX_BITS = 3          # CSR relative index width
IC_OC_SPARSE_LIMIT = 24     # IC|OC applies the sparsity factor only for ci/co <= 24
BITS_PER_KB = 1024 * 8

_DATAFLOW_KEYS = {"X|Y": "energy_XY", "IC|OC": "energy_ICOC", "Fx|Fy": "energy_FxFy",
                  "X|Fx": "energy_XFx"}
_CODING_KEYS = {c: f"size_kb_{c}" for c in CODINGS}

COST_KEYS = ("params", "macs", "bops", "bops_ratio", "sparse_bops", "weight_bits",
             "sparse_weight_bits", "model_bits", "model_ratio", "weight_ratio",
             "act_peak_bits", "act_total_bits", "size_kb_normal", "size_kb_csr",
             "size_kb_coo", "energy_XY", "energy_ICOC", "energy_FxFy", "energy_XFx")
"""Keys of :func:`compute_costs`' result."""


def check_dataflow(name: str) -> str:
  """Validates an EMOMC dataflow name (one of :data:`DATAFLOWS`)."""
  if name not in DATAFLOWS:
    raise ValueError(f"dataflow: unknown dataflow {name!r}; allowed: {list(DATAFLOWS)}")
  return name


def check_coding(name: str) -> str:
  """Validates an EMOMC coding name (one of :data:`CODINGS`, case-insensitive)."""
  low = name.lower() if isinstance(name, str) else name
  if low not in CODINGS:
    raise ValueError(f"coding: unknown coding scheme {name!r}; allowed: {list(CODINGS)}")
  return low


# ----------------------------------------------------------------------------------
# EMOMC per-layer counts (host numpy, float64).


def emomc_counts(workload: Workload, dataflow: str) -> np.ndarray:
  """EMOMC access counts ``[L, 5]``: mac, ifmap reads, weight reads, ofmap writes, psum reads.

  Args:
    workload: the workload.
    dataflow: one of :data:`DATAFLOWS` (dense layers are output-stationary in all).

  Returns:
    float64 ``[L, 5]``.
  """
  check_dataflow(dataflow)
  wl = workload
  m = wl.macs.astype(np.float64)
  kk = (wl.kernel_h * wl.kernel_w).astype(np.float64)
  k = wl.kernel_w.astype(np.float64)
  ci = (wl.in_channels // wl.groups).astype(np.float64)
  co = (wl.out_channels // wl.groups).astype(np.float64)
  o = (wl.out_h * wl.out_w).astype(np.float64)
  zero = np.zeros_like(m)
  if dataflow == "X|Y":
    conv = [m, m, m / o, m / (kk * ci), zero]
  elif dataflow == "IC|OC":
    conv = [m, m / co, m, m / ci, m / ci]
  elif dataflow == "Fx|Fy":
    conv = [m, m, m / o, m / kk, m / kk]
  else:
    conv = [m, m / k, m / np.sqrt(o), m / k, m / k]
  dense = [m, m, m, wl.out_act_elems.astype(np.float64), zero]   # = C_out for [N, C] inputs
  is_dense = np.asarray(wl.ops) == "dense"
  return np.stack([np.where(is_dense, d, c) for c, d in zip(conv, dense)], axis=1)


def _activation_terms(workload: Workload, dataflow: str):
  """ifmap/ofmap/psum energy per layer as ``(coef, kind, n)`` terms, kind in {1, p, s}.

  ``kind == "1"``: coef; ``"p"``: coef * p; ``"s"``: coef * (1 - (1 - p)^n).
  """
  counts = emomc_counts(workload, dataflow)
  ifm, ofm, psum = E_READ * counts[:, 1], E_WRITE * counts[:, 3], E_READ * counts[:, 4]
  terms = []
  for l in range(workload.num_layers):
    ci = int(workload.in_channels[l] // workload.groups[l])
    co = int(workload.out_channels[l] // workload.groups[l])
    kk = int(workload.kernel_h[l] * workload.kernel_w[l])
    k = int(workload.kernel_w[l])
    if workload.ops[l] == "dense":
      terms += [(ifm[l], "p", 0), (ofm[l], "1", 0)]
    elif dataflow == "X|Y":
      terms += [(ifm[l], "p", 0), (ofm[l], "1", 0), (psum[l], "1", 0)]
    elif dataflow == "IC|OC":
      terms.append((ifm[l], "s", co) if co <= IC_OC_SPARSE_LIMIT else (ifm[l], "1", 0))
      for c in (ofm[l], psum[l]):
        terms.append((c, "s", ci) if ci <= IC_OC_SPARSE_LIMIT else (c, "1", 0))
    elif dataflow == "Fx|Fy":
      terms += [(ifm[l], "p", 0), (ofm[l], "s", kk), (psum[l], "s", kk)]
    else:
      terms += [(ifm[l], "s", k), (ofm[l], "s", k), (psum[l], "s", k)]
  return terms


# ----------------------------------------------------------------------------------
# Vectorised costs (jnp).


class _Constants:
  """Host float64 constants of one workload, arranged as two small matrices.

  Every built-in cost is an affine function of a few per-config sums, so the whole
  batch is two matmuls (few XLA thunks: on a busy 2-core CPU the per-op dispatch, not
  the arithmetic, dominates):

  1. ``base = [b, b*a, a, sat(p), 1] @ B``: normalised sums ``sum_l v_l x_l / sum_l v_l``
     (O(1) numbers, so float32 keeps ~1e-7 relative accuracy even for 1e13 totals) and
     the keep-dependent EMOMC activation energies ``sum_n gamma_n (1 - (1 - p)^n)``;
  2. ``costs = [base, p * base, p, act_peak, 1] @ Q``: scales by the float64 totals.
  """

  def __init__(self, wl: Workload):
    f64 = lambda a: np.asarray(a, np.float64)
    L = wl.num_layers
    macs, weights, in_act = f64(wl.macs), f64(wl.weights), f64(wl.act_elems)
    La = wl.num_act_quantizers
    # None: layer l reads quantizer l (conv_inputs), no gather in the compiled costs.
    self.input_quantizer = (None if np.array_equal(wl.input_quantizer, np.arange(L))
                            and La == L else np.asarray(wl.input_quantizer, np.int32))
    total_macs, total_weights = macs.sum(), weights.sum()
    total_params = float(wl.total_params)
    other_params = total_params - total_weights
    fp32_bops = total_macs * FLOAT_BITS * FLOAT_BITS
    self.in_act = in_act.astype(np.float32)
    coo_index_bits = float((weights * np.round(np.log2(np.maximum(weights, 1.0)))).sum())
    # EMOMC energy = p * E_MAC * sum M (b+1) + sum E_READ wr_d (b+1) / 16 + act_d(p),
    # act_d(p) = c0_d + c1_d p + sum_n gamma_dn (1 - (1-p)^n).
    weight_read = {d: emomc_counts(wl, d)[:, 2] * E_READ / 16.0 for d in DATAFLOWS}
    const, lin, sat = {}, {}, {}
    ns = set()
    for d in DATAFLOWS:
      c0, c1, g = 0.0, 0.0, {}
      for coef, kind, n in _activation_terms(wl, d):
        if kind == "1":
          c0 += coef
        elif kind == "p":
          c1 += coef
        else:
          g[n] = g.get(n, 0.0) + coef
          ns.add(n)
      const[d], lin[d], sat[d] = c0, c1, g
    self.sat_n = np.asarray(sorted(ns), np.float32)
    nn_ = len(self.sat_n)

    # Stage 1: X = [b (L), b*a_in (L), a (La), sat (Nn), 1] -> base columns.
    base_names = (["w_weights", "w_macs"] + [f"w_wr:{d}" for d in DATAFLOWS]
                  + ["wa_macs", "a_act"] + [f"sat:{d}" for d in DATAFLOWS])
    col = {n: i for i, n in enumerate(base_names)}
    B = np.zeros((2 * L + La + nn_ + 1, len(base_names)))
    B[:L, col["w_weights"]] = weights / total_weights
    B[:L, col["w_macs"]] = macs / total_macs
    for d in DATAFLOWS:
      B[:L, col[f"w_wr:{d}"]] = weight_read[d] / weight_read[d].sum()
    B[L:2 * L, col["wa_macs"]] = macs / total_macs
    B[2 * L:2 * L + La, col["a_act"]] = in_act / in_act.sum()
    for j, n in enumerate(self.sat_n):
      for d in DATAFLOWS:
        B[2 * L + La + j, col[f"sat:{d}"]] = sat[d].get(int(n), 0.0) / ENERGY_SCALE
    self.B = B.astype(np.float32)

    # Stage 2: Z = [base (K), p * base (K), p, act_peak, 1] -> costs.
    K = len(base_names)
    zb = lambda name: col[name]
    zp = lambda name: K + col[name]
    z_p, z_peak, z_one = 2 * K, 2 * K + 1, 2 * K + 2
    Q = np.zeros((2 * K + 3, len(COST_KEYS)))
    q = {k: Q[:, i] for i, k in enumerate(COST_KEYS)}   # views into Q
    q["params"][z_one] = total_params
    q["macs"][z_one] = total_macs
    q["bops"][zb("wa_macs")] = fp32_bops / (FLOAT_BITS * FLOAT_BITS)
    q["bops_ratio"][zb("wa_macs")] = 1.0 / (FLOAT_BITS * FLOAT_BITS)
    q["sparse_bops"][zp("wa_macs")] = fp32_bops / (FLOAT_BITS * FLOAT_BITS)
    q["weight_bits"][zb("w_weights")] = total_weights
    q["sparse_weight_bits"][zp("w_weights")] = total_weights
    q["model_bits"][zb("w_weights")] = total_weights
    q["model_bits"][z_one] = FLOAT_BITS * other_params
    q["model_ratio"][zb("w_weights")] = total_weights / (FLOAT_BITS * total_params)
    q["model_ratio"][z_one] = other_params / total_params
    q["weight_ratio"][zb("w_weights")] = 1.0 / FLOAT_BITS
    q["act_peak_bits"][z_peak] = 1.0
    q["act_total_bits"][zb("a_act")] = in_act.sum()
    n_kb = total_weights / BITS_PER_KB
    q["size_kb_normal"][zb("w_weights")] = n_kb
    q["size_kb_csr"][zp("w_weights")] = n_kb
    q["size_kb_csr"][z_p] = n_kb * CSR_INDEX_BITS
    q["size_kb_coo"][zp("w_weights")] = n_kb
    q["size_kb_coo"][z_p] = coo_index_bits / BITS_PER_KB
    mac_total = total_macs * E_MAC / ENERGY_SCALE
    for d in DATAFLOWS:
      e = q[_DATAFLOW_KEYS[d]]
      e[zp("w_macs")] = mac_total                        # p * E_MAC * sum M b
      e[z_p] = mac_total + lin[d] / ENERGY_SCALE         # p * E_MAC * sum M, ifmap * p
      wr_total = weight_read[d].sum() / ENERGY_SCALE
      e[zb(f"w_wr:{d}")] = wr_total                      # sum wr b (/16 folded in)
      e[z_one] = wr_total + const[d] / ENERGY_SCALE      # sum wr, p-independent act.
      e[zb(f"sat:{d}")] = 1.0                            # saturating act. terms
    self.Q = Q.astype(np.float32)


_CONSTANTS: "weakref.WeakKeyDictionary[Workload, _Constants]" = weakref.WeakKeyDictionary()


def _constants(wl: Workload) -> _Constants:
  c = _CONSTANTS.get(wl)
  if c is None:
    c = _Constants(wl)
    _CONSTANTS[wl] = c
  return c


def _as_bits(bits) -> jax.Array:
  """float32 bit-widths; EMOMC's round(b) is only needed for non-integer input."""
  bits = jnp.asarray(bits)
  if jnp.issubdtype(bits.dtype, jnp.integer):
    return bits.astype(jnp.float32)
  return jnp.round(bits.astype(jnp.float32))


_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on accelerators


def cost_matrix(workload: Workload, configs: QuantConfig,
                keys: Sequence[str] = COST_KEYS) -> jax.Array:
  """Built-in costs as one ``float32 [P, len(keys)]`` matrix (pure, traceable).

  Args:
    workload: the workload (static).
    configs: ``QuantConfig`` with ``w_bits[P, L]``, ``a_bits[P, La]``, ``keep[P]``.
    keys: a subset of :data:`COST_KEYS` (column order).

  Returns:
    ``[P, len(keys)]``; see the module docstring for each cost. All minimised.
  """
  c = _constants(workload)
  idx = [COST_KEYS.index(k) for k in keys]
  w = _as_bits(configs.w_bits)
  a = _as_bits(configs.a_bits)
  p = jnp.broadcast_to(jnp.asarray(configs.keep, jnp.float32), w.shape[:-1])[..., None]
  one = jnp.ones_like(p)
  a_read = a if c.input_quantizer is None else a[..., c.input_quantizer]
  parts = [w, w * a_read, a]
  if c.sat_n.size:
    parts.append(1.0 - jnp.power(1.0 - p, c.sat_n))
  base = jnp.dot(jnp.concatenate(parts + [one], axis=-1), c.B, precision=_HIGHEST)
  peak = jnp.max(a * c.in_act, axis=-1, keepdims=True)
  z = jnp.concatenate([base, p * base, p, peak, one], axis=-1)
  return jnp.dot(z, c.Q[:, idx], precision=_HIGHEST)


def costs_jnp(workload: Workload, configs: QuantConfig) -> dict:
  """All built-in costs of a config batch as a dict of ``float32 [P]`` (pure, traceable).

  Prefer :func:`compute_costs` (validated, jit-compiled and cached); this is the
  function it compiles, usable inside a caller's own jit.

  Args:
    workload: the workload (static).
    configs: ``QuantConfig`` with ``w_bits[P, L]``, ``a_bits[P, La]``, ``keep[P]``.

  Returns:
    Dict with the keys :data:`COST_KEYS` (see the module docstring), each ``[P]``.
  """
  m = cost_matrix(workload, configs)
  return {k: m[..., i] for i, k in enumerate(COST_KEYS)}
