"""Hardware cost models: pure, jit-compiled functions over a batch of configs.

Every cost is minimised by the search (lower is better). Inputs are a population
``QuantConfig`` with ``w_bits[P, L]``, ``a_bits[P, L]`` (int, 32 = float) and
``keep[P]`` (fraction of weights kept); outputs are ``float32 [P]`` arrays. A workload's
static per-layer numbers are folded into the compiled function as constants, so there is
one compile per (workload, P). Every built-in cost is an affine function of a few
per-config sums, so the batch costs two small matmuls (:class:`_Constants`); on CPU the
batch is processed in cache-sized blocks (:func:`map_chunks`), ~3 million ResNet-50
configs/s for all objectives on 2 cores (``benchmarks/costs.py``).

Definitions (per image; ``b`` = weight bits, ``a`` = input-activation bits, ``p`` = keep)

* ``params``: every learnable parameter of the model (``Workload.total_params``).
* ``macs``: conv + dense multiply-accumulates (dense, pruning ignored).
* ``bops = sum_l macs_l * b_l * a_l``; FP32 is ``32 x 32`` (NEMO / AIMET / HAWQ-V3);
  ``bops_ratio = bops / (1024 * macs)``. ``sparse_bops = p * bops`` counts only the MACs
  of kept weights (an idealised sparse engine).
* ``weight_bits = sum_l weights_l * b_l``: dense storage, pruned zeros still stored.
  ``sparse_weight_bits = p * weight_bits`` (values of kept weights only, no index cost;
  see the EMOMC CSR/COO sizes for index costs).
* ``model_bits = weight_bits + 32 * (total_params - sum_l weights_l)``: biases and
  BatchNorm parameters are never quantized and stay FP32.
  ``model_ratio = model_bits / (32 * total_params)`` (NEMO's memory objective) and
  ``weight_ratio = weight_bits / (32 * sum_l weights_l)`` (quantized weights only).
* ``act_peak_bits = max_l in_act_elems_l * a_l``: the largest quantized layer input (the
  activation buffer a layer-by-layer accelerator must hold for one image);
  ``act_total_bits = sum_l in_act_elems_l * a_l`` (activation traffic per image).
* EMOMC model size in KB (bits / 8192), per layer with ``N = weights_l``, summed:
  Normal ``N * round(b)``, CSR ``N * round(b + 3) * p``, COO ``N * round(b + log2 N) * p``.
  Weights only (EMOMC counts no biases). Bit-widths are integers here, so
  ``round(b + log2 N) = b + round(log2 N)`` exactly (``log2 N`` never ends in .5).
* EMOMC energy (units of 0.01 mJ = relative total / 1e6) for the dataflows
  ``X|Y``, ``IC|OC``, ``Fx|Fy``, ``X|Fx``, exactly the formulas of PAPERS.md: per conv
  layer with ``k x k`` kernel (``k*k = k_h*k_w``, ``k = k_w`` for the ``Fx`` loop),
  ``ci = C_in / groups``, ``co = C_out / groups``, ``O = H_out * W_out``, ``M`` = MACs and
  counts ``[mac, ifmap reads, weight reads, ofmap writes, psum reads]``; dense layers use
  output-stationary counts ``[M, M, M, C_out, 0]`` in every dataflow. EMOMC keeps
  activations in FP16, so its energy ignores ``a_bits``.

Other cost models can be registered with :func:`register_cost` (e.g. a latency lookup
table) and are then available to :func:`compute_objectives` by name.
"""

from __future__ import annotations

import numbers
import weakref
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax._src.config import QuantConfig, validate_config
from nemo_jax._src.quant import FLOAT_BITS, MAX_BITS, MIN_BITS
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
  dense = [m, m, m, wl.out_channels.astype(np.float64), zero]
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
    macs, weights, in_act = f64(wl.macs), f64(wl.weights), f64(wl.in_act_elems)
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

    # Stage 1: X = [b (L), b*a (L), a (L), sat (Nn), 1] -> base columns.
    base_names = (["w_weights", "w_macs"] + [f"w_wr:{d}" for d in DATAFLOWS]
                  + ["wa_macs", "a_act"] + [f"sat:{d}" for d in DATAFLOWS])
    col = {n: i for i, n in enumerate(base_names)}
    B = np.zeros((3 * L + nn_ + 1, len(base_names)))
    B[:L, col["w_weights"]] = weights / total_weights
    B[:L, col["w_macs"]] = macs / total_macs
    for d in DATAFLOWS:
      B[:L, col[f"w_wr:{d}"]] = weight_read[d] / weight_read[d].sum()
    B[L:2 * L, col["wa_macs"]] = macs / total_macs
    B[2 * L:3 * L, col["a_act"]] = in_act / in_act.sum()
    for j, n in enumerate(self.sat_n):
      for d in DATAFLOWS:
        B[3 * L + j, col[f"sat:{d}"]] = sat[d].get(int(n), 0.0) / ENERGY_SCALE
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
    configs: ``QuantConfig`` with ``w_bits[P, L]``, ``a_bits[P, L]``, ``keep[P]``.
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
  parts = [w, w * a, a]
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
    configs: ``QuantConfig`` with ``w_bits[P, L]``, ``a_bits[P, L]``, ``keep[P]``.

  Returns:
    Dict with the keys :data:`COST_KEYS` (see the module docstring), each ``[P]``.
  """
  m = cost_matrix(workload, configs)
  return {k: m[..., i] for i, k in enumerate(COST_KEYS)}


# ----------------------------------------------------------------------------------
# Validation.


def _reject_bits(field: str, arr: np.ndarray, layer_names) -> None:
  bad = ~((arr >= MIN_BITS) & (arr <= MAX_BITS) & (arr == np.round(arr)))
  if bad.any():
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    layer = layer_names[idx[-1]] if layer_names else idx[-1]
    raise ValueError(f"{field}{list(idx)} (layer {layer}): bit-width {arr[idx]!r} not "
                     f"allowed; allowed: integers {MIN_BITS}..{MAX_BITS} "
                     f"({FLOAT_BITS} = float)")


def validate_configs(workload: Workload, configs: QuantConfig) -> QuantConfig:
  """Checks a config batch on the host and returns it as ``int32``/``float32`` arrays.

  Accepts one member (``w_bits[L]``) or a batch (``w_bits[P, L]``); a scalar keep is
  broadcast over the batch.

  Raises:
    ValueError naming the field, the offending value and the allowed values.
  """
  num_layers = workload.num_layers
  w = np.asarray(configs.w_bits)
  a = np.asarray(configs.a_bits)
  for field, arr in (("w_bits", w), ("a_bits", a)):
    if arr.ndim not in (1, 2) or arr.shape[-1] != num_layers:
      raise ValueError(f"{field}: expected shape [L] or [P, L] with L={num_layers} "
                       f"(one bit-width per quantized layer of {workload.model_name}), "
                       f"got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
      raise ValueError(f"{field}: expected integer bit-widths, got dtype {arr.dtype}")
  if w.shape != a.shape:
    raise ValueError(f"a_bits: shape {a.shape} differs from w_bits shape {w.shape}")
  _reject_bits("w_bits", w, workload.layer_names)
  _reject_bits("a_bits", a, workload.layer_names)
  keep = np.asarray(configs.keep, np.float64)
  if keep.ndim > 1 or (keep.ndim == 1 and keep.shape != w.shape[:-1]):
    raise ValueError(f"keep: expected a scalar or shape {w.shape[:-1]}, got {keep.shape}")
  bad = ~((keep > 0.0) & (keep <= 1.0))
  if bad.any():
    raise ValueError(f"keep: keep ratio {keep[bad].ravel()[0]!r} outside the allowed "
                     "range (0, 1]")
  keep = np.broadcast_to(keep, w.shape[:-1])
  return QuantConfig(w_bits=jnp.asarray(w, jnp.int32), a_bits=jnp.asarray(a, jnp.int32),
                     keep=jnp.asarray(keep, jnp.float32))


def _is_concrete(configs) -> bool:
  return not any(isinstance(leaf, jax.core.Tracer)
                 for leaf in jax.tree_util.tree_leaves(configs))


# ----------------------------------------------------------------------------------
# Registry and compiled entry points.

CostFn = Callable[[Workload, QuantConfig], jax.Array]
_REGISTRY: dict[str, CostFn] = {}


def register_cost(name: str, fn: CostFn, overwrite: bool = False) -> None:
  """Registers a cost ``fn(workload, configs) -> float32 [P]`` (jnp, traceable; minimised).

  Args:
    name: objective name used by :func:`compute_objectives`.
    fn: pure function of the static workload and a config batch (``[P, L]`` bits,
      ``[P]`` keep), e.g. a latency lookup table gathered by bit-width.
    overwrite: allow replacing an existing name.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"name: expected a non-empty string, got {name!r}")
  if not callable(fn):
    raise ValueError(f"fn: expected a callable (workload, configs) -> [P], got {fn!r}")
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"name: cost {name!r} already registered (pass overwrite=True)")
  _REGISTRY[name] = fn
  _OBJECTIVE_FNS.clear()


def unregister_cost(name: str) -> None:
  """Removes a cost registered with :func:`register_cost` (built-ins cannot be removed)."""
  if name in _BUILTIN_NAMES:
    raise ValueError(f"name: {name!r} is a built-in cost and cannot be unregistered")
  if name not in _REGISTRY:
    raise ValueError(f"name: unknown cost {name!r}; registered: {list(_REGISTRY)}")
  del _REGISTRY[name]
  _OBJECTIVE_FNS.clear()


def available_objectives() -> tuple[str, ...]:
  """Names accepted by :func:`compute_objectives` (built-ins first)."""
  return tuple(_REGISTRY)


def check_objectives(names: Sequence[str]) -> tuple[str, ...]:
  """Validates objective names; returns them as a tuple."""
  if isinstance(names, str):
    names = (names,)
  names = tuple(names)
  if not names:
    raise ValueError(f"objectives: empty; allowed: {list(_REGISTRY)}")
  for n in names:
    if n not in _REGISTRY:
      raise ValueError(f"objectives: unknown objective {n!r}; allowed: {list(_REGISTRY)}")
  return names


def _builtin(key: str) -> CostFn:
  return lambda workload, configs: cost_matrix(workload, configs, (key,))[..., 0]


_BUILTIN_KEYS: dict[str, str] = {k: k for k in (
    "params", "macs", "bops", "bops_ratio", "sparse_bops", "weight_bits",
    "sparse_weight_bits", "model_bits", "model_ratio", "weight_ratio", "act_peak_bits",
    "act_total_bits")}
_BUILTIN_KEYS.update({f"size_kb:{c}": k for c, k in _CODING_KEYS.items()})
_BUILTIN_KEYS.update({f"energy:{d}": k for d, k in _DATAFLOW_KEYS.items()})
for _name, _key in _BUILTIN_KEYS.items():
  _REGISTRY[_name] = _builtin(_key)

_BUILTIN_NAMES = frozenset(_REGISTRY)
_BUILTIN_FNS = dict(_REGISTRY)

_COSTS_FNS: "weakref.WeakKeyDictionary[Workload, dict]" = weakref.WeakKeyDictionary()
_OBJECTIVE_FNS: dict = {}

DEFAULT_CPU_CHUNK = 4096
"""Configs per block on CPU: keeps intermediates cache-resident (~5x faster than one
block for 100k configs on 2 cores); accelerators evaluate the batch in one block."""


def _resolve_chunk(chunk_size) -> int | None:
  if isinstance(chunk_size, str) and chunk_size == "auto":
    return DEFAULT_CPU_CHUNK if jax.default_backend() == "cpu" else None
  if chunk_size is None:
    return None
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
      or chunk_size < 1):
    raise ValueError(f"chunk_size: expected a positive integer, None or 'auto', "
                     f"got {chunk_size!r}")
  return int(chunk_size)


def map_chunks(fn: Callable[[QuantConfig], jax.Array], configs: QuantConfig,
               chunk_size: int | None) -> jax.Array:
  """Applies ``fn: configs[P'] -> [P', ...]`` to blocks of ``chunk_size`` configs.

  A sequential ``fori_loop`` over ``ceil(P / chunk_size)`` blocks read with
  ``dynamic_slice`` (no copy of the inputs; the last block is shifted back to end at
  ``P`` and overlaps its predecessor, recomputing a few rows), writing into one output
  buffer. Keeps ``fn``'s intermediates cache-resident. (Padding or slicing the batch to
  a multiple of the block costs a full copy of the inputs: as much as the costs.)
  ``chunk_size=None`` or ``P <= chunk_size``: one call.
  """
  w = jnp.asarray(configs.w_bits)
  num = w.shape[0]
  if chunk_size is None or num <= chunk_size:
    return fn(configs)
  blocks = -(-num // chunk_size)
  keep = jnp.broadcast_to(jnp.asarray(configs.keep, jnp.float32), (num,))
  leaves = (w, jnp.asarray(configs.a_bits), keep)

  def block(start):
    return QuantConfig(*(jax.lax.dynamic_slice_in_dim(x, start, chunk_size)
                         for x in leaves))

  shape = jax.eval_shape(lambda: fn(block(0)))
  out = jnp.zeros((num,) + shape.shape[1:], shape.dtype)

  def body(i, out):
    start = jnp.minimum(i * chunk_size, num - chunk_size)
    return jax.lax.dynamic_update_slice_in_dim(out, fn(block(start)), start, axis=0)

  return jax.lax.fori_loop(0, blocks, body, out)


def make_costs_fn(workload: Workload, chunk_size="auto") -> Callable[[QuantConfig], dict]:
  """The jitted ``configs[P] -> dict of [P]`` for one workload (cached; no validation).

  Args:
    workload: the workload.
    chunk_size: configs per block (see :func:`map_chunks`); ``"auto"``: 4096 on CPU,
      one block on accelerators.
  """
  chunk = _resolve_chunk(chunk_size)
  per_workload = _COSTS_FNS.setdefault(workload, {})
  fn = per_workload.get(chunk)
  if fn is None:
    def costs_fn(configs):
      m = map_chunks(lambda c: cost_matrix(workload, c), configs, chunk)
      return {k: m[:, i] for i, k in enumerate(COST_KEYS)}
    fn = per_workload[chunk] = jax.jit(costs_fn)
  return fn


def objectives_jnp(workload: Workload, configs: QuantConfig,
                   names: Sequence[str]) -> jax.Array:
  """Objective matrix ``float32 [P, k]`` (pure, traceable; names not validated).

  Built-in objectives come from ONE :func:`cost_matrix` call (two matmuls); registered
  costs are evaluated and spliced in at their columns.
  """
  builtin = [n for n in names if _REGISTRY[n] is _BUILTIN_FNS.get(n)]
  mat = (cost_matrix(workload, configs, [_BUILTIN_KEYS[n] for n in builtin])
         if builtin else None)
  if len(builtin) == len(names):
    return mat
  cols = []
  for n in names:
    if n in builtin:
      cols.append(mat[..., builtin.index(n)])
    else:
      cols.append(jnp.asarray(_REGISTRY[n](workload, configs), jnp.float32))
  return jnp.stack(cols, axis=-1)


def make_objectives_fn(workload: Workload, names: Sequence[str],
                       chunk_size="auto") -> Callable:
  """The jitted ``configs[P] -> float32 [P, k]`` for objective ``names`` (cached).

  Args:
    workload: the workload.
    names: objective names (:func:`available_objectives`).
    chunk_size: configs per block (see :func:`make_costs_fn`).
  """
  names = check_objectives(names)
  chunk = _resolve_chunk(chunk_size)
  key = (weakref.ref(workload), names, chunk)
  fn = _OBJECTIVE_FNS.get(key)
  if fn is None:
    fn = jax.jit(lambda configs: map_chunks(
        lambda c: objectives_jnp(workload, c, names), configs, chunk))
    _OBJECTIVE_FNS[key] = fn
  return fn


def _prepare(workload: Workload, configs: QuantConfig, validate: bool):
  single = np.ndim(configs.w_bits) == 1
  if validate and _is_concrete(configs):
    configs = validate_configs(workload, configs)
  if single:
    configs = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], configs)
  return configs, single


def compute_costs(workload: Workload, configs: QuantConfig, validate: bool = True,
                  chunk_size="auto") -> dict:
  """All built-in costs (module docstring) for a config batch; all minimised.

  Args:
    workload: the workload.
    configs: ``QuantConfig`` with ``w_bits[P, L]``, ``a_bits[P, L]``, ``keep[P]`` (or one
      member without the P axis).
    validate: check shapes and values on the host first (skipped for tracers).
    chunk_size: configs per block (:func:`make_costs_fn`).

  Returns:
    Dict with keys :data:`COST_KEYS`, each ``float32 [P]`` (scalars for one member).
  """
  configs, single = _prepare(workload, configs, validate)
  out = make_costs_fn(workload, chunk_size)(configs)
  return {k: v[0] for k, v in out.items()} if single else out


def compute_objectives(workload: Workload, configs: QuantConfig, names: Sequence[str],
                       validate: bool = True, chunk_size="auto") -> jax.Array:
  """Objective matrix ``float32 [P, k]`` for the registered ``names`` (all minimised).

  Args:
    workload: the workload.
    configs: config batch (or one member).
    names: objective names, see :func:`available_objectives`.
    validate: check configs on the host first.
    chunk_size: configs per block (:func:`make_costs_fn`).

  Returns:
    ``[P, k]`` (``[k]`` for one member).
  """
  fn = make_objectives_fn(workload, names, chunk_size)
  configs, single = _prepare(workload, configs, validate)
  out = fn(configs)
  return out[0] if single else out


def emomc_energy(workload: Workload, configs: QuantConfig, dataflow: str) -> jax.Array:
  """EMOMC energy (0.01 mJ) ``[P]`` under ``dataflow`` (one of :data:`DATAFLOWS`)."""
  return compute_costs(workload, configs)[_DATAFLOW_KEYS[check_dataflow(dataflow)]]


def emomc_size_kb(workload: Workload, configs: QuantConfig, coding: str) -> jax.Array:
  """EMOMC model size in KB ``[P]`` under ``coding`` (one of :data:`CODINGS`)."""
  return compute_costs(workload, configs)[_CODING_KEYS[check_coding(coding)]]


# ----------------------------------------------------------------------------------
# Per-layer report for one config (host numpy, float64).


def _saturate(p: float, n) -> np.ndarray:
  return 1.0 - (1.0 - p) ** np.asarray(n, np.float64)


def layer_costs_numpy(workload: Workload, w_bits, a_bits, keep: float) -> dict:
  """Per-layer costs of ONE config in float64 numpy (reference for the jitted version).

  Returns:
    Dict of ``[L]`` float64 arrays: ``macs``, ``params``, ``bops``, ``weight_bits``,
    ``act_bits`` (input activation bits), ``size_kb_{normal,csr,coo}``,
    ``energy_{XY,ICOC,FxFy,XFx}``.
  """
  wl = workload
  b = np.round(np.asarray(w_bits, np.float64))
  a = np.round(np.asarray(a_bits, np.float64))
  p = float(keep)
  n = wl.weights.astype(np.float64)
  out = {"macs": wl.macs.astype(np.float64), "params": wl.params.astype(np.float64),
         "bops": wl.macs * b * a, "weight_bits": n * b,
         "act_bits": wl.in_act_elems * a,
         "size_kb_normal": n * np.round(b) / BITS_PER_KB,
         "size_kb_csr": n * np.round(b + CSR_INDEX_BITS) * p / BITS_PER_KB,
         "size_kb_coo": n * np.round(b + np.log2(np.maximum(n, 1))) * p / BITS_PER_KB}
  ci = wl.in_channels // wl.groups
  co = wl.out_channels // wl.groups
  kk = wl.kernel_h * wl.kernel_w
  k = wl.kernel_w
  dense = np.asarray(wl.ops) == "dense"
  one = np.ones(wl.num_layers)
  for d in DATAFLOWS:
    mac, ifm, wr, ofm, psum = emomc_counts(wl, d).T
    e = E_MAC * mac * p * (np.round(b) + 1) + E_READ * wr * (np.round(b) + 1) / 16
    if d == "X|Y":
      fi, fo, fp = p * one, one, one
    elif d == "IC|OC":
      fi = np.where(co <= IC_OC_SPARSE_LIMIT, _saturate(p, co), 1.0)
      fo = fp = np.where(ci <= IC_OC_SPARSE_LIMIT, _saturate(p, ci), 1.0)
    elif d == "Fx|Fy":
      fi, fo, fp = p * one, _saturate(p, kk), _saturate(p, kk)
    else:
      fi = fo = fp = _saturate(p, k)
    fi = np.where(dense, p, fi)
    fo = np.where(dense, 1.0, fo)
    e = e + E_READ * ifm * fi + E_WRITE * ofm * fo + E_READ * psum * fp
    out[_DATAFLOW_KEYS[d]] = e / ENERGY_SCALE
  return out


def cost_report(workload: Workload, config: QuantConfig) -> dict:
  """JSON-ready costs of ONE config with a per-layer breakdown (``nemo-jax costs``).

  Args:
    workload: the workload.
    config: one member (``w_bits[L]``, ``a_bits[L]``, scalar ``keep``).

  Returns:
    ``{"params", "macs", "bops", "bops_ratio", "model_ratio",
    "size_kb": {"normal", "csr", "coo"}, "energy": {"X|Y", "IC|OC", "Fx|Fy", "X|Fx"},
    "layers": [...]}`` with plain python numbers; energy in EMOMC units (0.01 mJ).

  Raises:
    ValueError: wrong lengths, bits outside 1..32 or keep outside (0, 1].
  """
  keep = float(np.asarray(config.keep))  # before validation's float32 cast: exact p
  config = validate_config(config, workload.num_layers, workload.layer_names)
  w = np.asarray(config.w_bits)
  a = np.asarray(config.a_bits)
  p = keep
  per = layer_costs_numpy(workload, w, a, p)
  total_macs = float(per["macs"].sum())
  total_weights = float(workload.weights.sum())
  other = workload.total_params - total_weights
  bops = float(per["bops"].sum())
  model_bits = float(per["weight_bits"].sum()) + FLOAT_BITS * other
  layers = []
  for i in range(workload.num_layers):
    layers.append({
        "index": i, "name": workload.layer_names[i], "op": workload.ops[i],
        "w_bits": int(w[i]), "a_bits": int(a[i]),
        "params": int(workload.params[i]), "weights": int(workload.weights[i]),
        "macs": int(workload.macs[i]), "bops": int(round(per["bops"][i])),
        "weight_bits": int(round(per["weight_bits"][i])),
        "act_bits": int(round(per["act_bits"][i])),
        "size_kb": {c: float(per[_CODING_KEYS[c]][i]) for c in CODINGS},
        "energy": {d: float(per[_DATAFLOW_KEYS[d]][i]) for d in DATAFLOWS},
    })
  return {
      "params": int(workload.total_params),
      "macs": int(workload.total_macs),
      "bops": int(round(bops)),
      "bops_ratio": bops / (total_macs * FLOAT_BITS * FLOAT_BITS),
      "model_ratio": model_bits / (FLOAT_BITS * workload.total_params),
      "size_kb": {c: float(per[_CODING_KEYS[c]].sum()) for c in CODINGS},
      "energy": {d: float(per[_DATAFLOW_KEYS[d]].sum()) for d in DATAFLOWS},
      "layers": layers,
  }
