"""Benchmark: every built-in cost for 100,000 random ResNet-50 configs in one jitted call.

Prints ONE JSON line: configs/s of the jitted batch (after compilation, best of
``--repeats``) and of a per-config float64 numpy loop (``costs.layer_costs_numpy``, the
reference the tests compare to) measured in the same run, and their ratio.
Target: >= 1,000,000 configs/s on a 2-core CPU.

Usage: ``python benchmarks/costs.py [--model resnet50] [--configs 100000]``
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from nemo_jax import QuantConfig, costs
from nemo_jax.costs import extract_workload

TARGET_CONFIGS_PER_S = 1_000_000


def random_configs(rng: np.random.Generator, num: int, num_layers: int) -> QuantConfig:
  return QuantConfig(w_bits=rng.integers(2, 9, (num, num_layers)).astype(np.int32),
                     a_bits=rng.integers(2, 9, (num, num_layers)).astype(np.int32),
                     keep=rng.uniform(0.2, 1.0, num).astype(np.float32))


def numpy_loop(workload, configs: QuantConfig, names) -> np.ndarray:
  """The baseline: per-config numpy (float64) evaluation of the same objectives."""
  total_w = float(workload.weights.sum())
  other = workload.total_params - total_w
  fp32_bops = float(workload.macs.sum()) * 1024
  rows = []
  for w, a, p in zip(configs.w_bits, configs.a_bits, configs.keep):
    per = costs.layer_costs_numpy(workload, w, a, float(p))
    bops = per["bops"].sum()
    wbits = per["weight_bits"].sum()
    vals = {"params": workload.total_params, "macs": workload.total_macs, "bops": bops,
            "bops_ratio": bops / fp32_bops, "sparse_bops": p * bops, "weight_bits": wbits,
            "sparse_weight_bits": p * wbits, "model_bits": wbits + 32 * other,
            "model_ratio": (wbits + 32 * other) / (32 * workload.total_params),
            "weight_ratio": wbits / (32 * total_w), "act_peak_bits": per["act_bits"].max(),
            "act_total_bits": per["act_bits"].sum()}
    for c in costs.CODINGS:
      vals[f"size_kb:{c}"] = per[f"size_kb_{c}"].sum()
    for d, key in zip(costs.DATAFLOWS, ("energy_XY", "energy_ICOC", "energy_FxFy",
                                        "energy_XFx")):
      vals[f"energy:{d}"] = per[key].sum()
    rows.append([vals[n] for n in names])
  return np.asarray(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet50")
  parser.add_argument("--configs", type=int, default=100_000)
  parser.add_argument("--loop-configs", type=int, default=300)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()

  wl = extract_workload(args.model)
  names = list(costs.CostRegistry.default())
  rng = np.random.default_rng(0)
  cfg = random_configs(rng, args.configs, wl.num_layers)
  cfg_dev = jax.device_put(cfg)
  fn = costs.make_objectives_fn(wl, names)

  t0 = time.perf_counter()
  out = fn(cfg_dev).block_until_ready()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    out = fn(cfg_dev).block_until_ready()
    times.append(time.perf_counter() - t0)
  jit_s = min(times)

  small = QuantConfig(*(np.asarray(x)[:args.loop_configs]
                        for x in (cfg.w_bits, cfg.a_bits, cfg.keep)))
  t0 = time.perf_counter()
  ref = numpy_loop(wl, small, names)
  loop_s = time.perf_counter() - t0
  max_rel_err = float(np.max(np.abs(np.asarray(out[:args.loop_configs], np.float64) - ref)
                             / np.maximum(np.abs(ref), 1e-30)))

  jit_rate = args.configs / jit_s
  loop_rate = args.loop_configs / loop_s
  print(json.dumps({
      "benchmark": "costs", "model": args.model, "layers": wl.num_layers,
      "objectives": len(names), "configs": args.configs,
      "backend": jax.default_backend(), "compile_s": round(compile_s, 3),
      "jit_s": round(jit_s, 5), "configs_per_s": round(jit_rate),
      "numpy_loop_configs_per_s": round(loop_rate, 1),
      "speedup_vs_numpy_loop": round(jit_rate / loop_rate, 1),
      "max_rel_err_vs_numpy": max_rel_err,
      "target_configs_per_s": TARGET_CONFIGS_PER_S,
      "meets_target": jit_rate >= TARGET_CONFIGS_PER_S}))


if __name__ == "__main__":
  main()
