"""Per-layer costs of ONE configuration in float64 numpy (``nemo-jax costs``).

An independent, loop-free numpy transcription of the formulas (``formulas.py``): it is
the reference the vectorised float32 costs are tested against, and the per-layer
breakdown users read.
"""

from __future__ import annotations

import numpy as np

from nemo_jax._src.qconfig import QuantConfig, validate_configs
from nemo_jax._src.costs.formulas import (BITS_PER_KB, CODINGS, CSR_INDEX_BITS, DATAFLOWS,
                                              E_MAC, E_READ, E_WRITE, ENERGY_SCALE,
                                              IC_OC_SPARSE_LIMIT, _CODING_KEYS,
                                              _DATAFLOW_KEYS, emomc_counts)
from nemo_jax._src.quant import FLOAT_BITS
from nemo_jax._src.workload import Workload


def _saturate(p: float, n) -> np.ndarray:
  return 1.0 - (1.0 - p) ** np.asarray(n, np.float64)


def layer_costs_numpy(workload: Workload, w_bits, a_bits, keep: float) -> dict:
  """Per-layer costs of ONE config in float64 numpy (reference for the jitted version).

  Returns:
    Dict of ``[L]`` float64 arrays: ``macs``, ``params``, ``bops``, ``weight_bits``,
    ``act_bits`` (bits of the input activation the layer reads; ``a_bits`` has one
    entry per activation quantizer), ``size_kb_{normal,csr,coo}``,
    ``energy_{XY,ICOC,FxFy,XFx}``.
  """
  wl = workload
  b = np.round(np.asarray(w_bits, np.float64))
  # The bits of the activation quantizer each layer reads.
  a = np.round(np.asarray(a_bits, np.float64))[wl.input_quantizer]
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
    config: one member (``w_bits[L]``, ``a_bits[La]``, scalar ``keep``).

  Returns:
    ``{"params", "macs", "bops", "bops_ratio", "model_ratio",
    "size_kb": {"normal", "csr", "coo"}, "energy": {"X|Y", "IC|OC", "Fx|Fy", "X|Fx"},
    "layers": [...]}`` with plain python numbers; energy in EMOMC units (0.01 mJ).

  Raises:
    ValueError: wrong lengths, bits outside 1..32 or keep outside (0, 1].
  """
  keep = float(np.asarray(config.keep))  # before validation's float32 cast: exact p
  config = validate_configs(config, workload.num_layers, workload.layer_names,
                            num_act_quantizers=workload.num_act_quantizers)
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
        "w_bits": int(w[i]), "a_bits": int(a[workload.input_quantizer[i]]),
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
