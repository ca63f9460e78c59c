"""The EMOMC results table: energy improvement and size compression at <= 0.5% loss.

For a finished EMOMC search (``nemo-jax search`` with a library) the table lists, against
the uncompressed FP32 model (dense, float32 weights, ``energy`` and ``size`` with
32-bit weights and keep 1):

* ``EMOMC``: the chosen front member: among the members whose top-1 on the final split
  is at most ``max_loss`` (default 0.5 percentage points) below the FP32 model's, the
  one with the smallest ``criterion`` (default: the search's first cost objective);
* ``pruning only``: the library models (every searched keep ratio) with float32
  weights, chosen the same way;
* ``quantization only (uniform)``: the dense model (p = 1) with every weight at the same
  bit-width, for each ``bit_choices`` value, chosen the same way;
* ``quantization only (searched)``: optionally, the front of a second search on the same
  library with ``keep_choices=[1.0]``, chosen the same way.

Each row gives the energy improvement ``E_FP32 / E`` (x) per dataflow (X|Y, IC|OC,
Fx|Fy, X|Fx) and the size compression ``S_FP32 / S`` (x) per coding (normal, CSR, COO),
all from the same cost functions (``costs.py``) the search minimised. Accuracies are
measured by the same evaluator (FP16 activations); the FP32 reference is the FP32
configuration of that evaluator (dense entry, float32 weights and activations).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from nemo_jax._src import costs as costs_lib
from nemo_jax._src import data as data_lib
from nemo_jax._src import quant
from nemo_jax._src.config import QuantConfig
from nemo_jax._src.problem import build_problem
from nemo_jax._src.search.config import ACCURACY_OBJECTIVES, load_search_config

DEFAULT_MAX_LOSS = 0.005
TABLE_JSON = "emomc_table.json"
TABLE_CSV = "emomc_table.csv"
ENERGY_NAMES = tuple(f"energy:{d}" for d in costs_lib.DATAFLOWS)
SIZE_NAMES = tuple(f"size_kb:{c}" for c in costs_lib.CODINGS)


def all_costs(workload, keep: Sequence[float], w_bits, act_bits: int = 16) -> list[dict]:
  """EMOMC energy per dataflow and size per coding of configurations ``[P]``.

  Args:
    workload: the model's workload.
    keep: keep ratios ``[P]``.
    w_bits: weight bit-widths ``[P, L]``.
    act_bits: activation bits (EMOMC's costs ignore them).

  Returns:
    One dict per configuration ``{"energy:X|Y": .., ..., "size_kb:coo": ..}`` (0.01 mJ, KB).
  """
  w = np.asarray(w_bits, np.int32)
  configs = QuantConfig(w_bits=jnp.asarray(w),
                        a_bits=jnp.full((len(w), workload.num_act_quantizers), act_bits, jnp.int32),
                        keep=jnp.asarray(np.asarray(keep, np.float32)))
  names = ENERGY_NAMES + SIZE_NAMES
  values = np.asarray(costs_lib.compute_objectives(workload, configs, names), np.float64)
  return [{n: float(v) for n, v in zip(names, row)} for row in values]


def fp32_costs(workload) -> dict:
  """Costs of the uncompressed FP32 model (32-bit weights, keep 1)."""
  L = workload.num_layers
  return all_costs(workload, [1.0], np.full((1, L), quant.FLOAT_BITS), quant.FLOAT_BITS)[0]


def table_row(method: str, costs: dict, reference: dict, top1: float | None,
              fp32_top1: float, keep: float | None = None, w_bits=None) -> dict:
  """One table row: improvements (x) over ``reference`` and the accuracy loss."""
  return {
      "method": method, "keep": keep,
      "w_bits": None if w_bits is None else [int(b) for b in w_bits],
      "top1": top1, "accuracy_loss": None if top1 is None else fp32_top1 - top1,
      "energy_x": {n.split(":", 1)[1]: reference[n] / costs[n] for n in ENERGY_NAMES},
      "size_x": {n.split(":", 1)[1]: reference[n] / costs[n] for n in SIZE_NAMES},
      "costs": dict(costs)}


def choose(candidates: Sequence[dict], fp32_top1: float, max_loss: float,
           criterion: str) -> dict | None:
  """The candidate with the smallest ``criterion`` cost among those within ``max_loss``.

  Candidates are dicts with ``top1`` and ``costs``; ties go to the higher accuracy.
  """
  ok = [c for c in candidates if c["top1"] is not None and np.isfinite(c["top1"])
        and c["top1"] >= fp32_top1 - max_loss - 1e-12]
  if not ok:
    return None
  return min(ok, key=lambda c: (c["costs"][criterion], -c["top1"]))


def build_table(rows: Sequence[dict | None], fp32_top1: float, max_loss: float,
                criterion: str, labels: Sequence[str]) -> dict:
  """Assembles the table dict (rows that found no candidate are reported as such)."""
  out_rows = []
  for label, row in zip(labels, rows):
    out_rows.append(row if row is not None else {"method": label, "keep": None,
                                                 "w_bits": None, "top1": None,
                                                 "accuracy_loss": None, "energy_x": None,
                                                 "size_x": None, "costs": None,
                                                 "note": f"no candidate within {max_loss:.2%}"})
  return {"fp32_top1": fp32_top1, "max_loss": max_loss, "criterion": criterion,
          "rows": out_rows}


def format_table(table: dict) -> str:
  """Text version of the table (improvements as ``12.3x``)."""
  dfs = list(costs_lib.DATAFLOWS)
  cds = list(costs_lib.CODINGS)
  head = (f"{'method':<30} {'keep':>5} {'top1':>7} {'loss':>6} | "
          + " ".join(f"{'E ' + d:>9}" for d in dfs) + " | "
          + " ".join(f"{'S ' + c:>8}" for c in cds))
  lines = [f"EMOMC table: FP32 top-1 {100 * table['fp32_top1']:.2f}%, max loss "
           f"{100 * table['max_loss']:.2f}%, chosen by min {table['criterion']}", head,
           "-" * len(head)]
  for r in table["rows"]:
    if r.get("energy_x") is None:
      lines.append(f"{r['method']:<30} {r.get('note', '')}")
      continue
    keep = f"{r['keep']:.2f}" if r["keep"] is not None else "-"
    lines.append(f"{r['method']:<30} {keep:>5} {100 * r['top1']:>6.2f}% "
                 f"{100 * r['accuracy_loss']:>5.2f}% | "
                 + " ".join(f"{r['energy_x'][d]:>8.2f}x" for d in dfs) + " | "
                 + " ".join(f"{r['size_x'][c]:>7.2f}x" for c in cds))
  return "\n".join(lines)


def write_table(table: dict, out_dir: str) -> tuple[str, str]:
  """Writes ``emomc_table.json`` and ``emomc_table.csv`` into ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  jpath, cpath = os.path.join(out_dir, TABLE_JSON), os.path.join(out_dir, TABLE_CSV)
  with open(jpath, "w") as f:
    json.dump(table, f, indent=1)
  cols = (["method", "keep", "top1", "accuracy_loss"]
          + [f"energy_x:{d}" for d in costs_lib.DATAFLOWS]
          + [f"size_x:{c}" for c in costs_lib.CODINGS] + ["w_bits"])
  with open(cpath, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for r in table["rows"]:
      ex, sx = r.get("energy_x") or {}, r.get("size_x") or {}
      w.writerow([r["method"], r["keep"], r["top1"], r["accuracy_loss"]]
                 + [ex.get(d) for d in costs_lib.DATAFLOWS]
                 + [sx.get(c) for c in costs_lib.CODINGS]
                 + [" ".join(map(str, r["w_bits"])) if r["w_bits"] else ""])
  return jpath, cpath


# --------------------------------------------------------------------------- from a run


def _evaluate_top1(problem, evaluator, keep, w_bits) -> np.ndarray:
  """Top-1 of configurations ``[P]`` in chunks of the population size."""
  keep = np.asarray(keep, np.float64)
  w = np.asarray(w_bits)
  out = []
  step = problem.cfg.population
  for s in range(0, len(keep), step):
    configs = problem.configs(keep[s:s + step], w[s:s + step])
    out.append(np.asarray(evaluator.run(configs).top1, np.float64))
  return np.concatenate(out) if out else np.zeros((0,))


def _front_candidates(problem, evaluator, front: list[dict]) -> list[dict]:
  missing = [m for m in front if "final_top1" not in m]
  if missing:
    top1 = _evaluate_top1(problem, evaluator, [m["keep"] for m in missing],
                          [m["w_bits"] for m in missing])
    for m, t in zip(missing, top1):
      m["final_top1"] = float(t)
  costs = all_costs(problem.workload, [m["keep"] for m in front], [m["w_bits"] for m in front])
  return [{"keep": m["keep"], "w_bits": m["w_bits"], "top1": m["final_top1"], "costs": c}
          for m, c in zip(front, costs)]


def _row(label, cand, reference, fp32_top1):
  if cand is None:
    return None
  return table_row(label, cand["costs"], reference, cand["top1"], fp32_top1, cand["keep"],
                   cand["w_bits"])


def emomc_report(run_dir: str, quant_run: str | None = None,
                 max_loss: float = DEFAULT_MAX_LOSS, criterion: str | None = None,
                 out_dir: str | None = None, problem=None, progress: bool = False) -> dict:
  """Builds (and writes) the EMOMC table of a finished search directory.

  Args:
    run_dir: a ``nemo-jax search`` output directory of a library search.
    quant_run: optional second run (same library, ``keep_choices=[1.0]``): the searched
      quantization-only baseline.
    max_loss: accuracy loss allowed vs the FP32 model (fraction; EMOMC: 0.005).
    criterion: the cost minimised among admissible members (default: the run's first
      cost objective).
    out_dir: where to write ``emomc_table.{json,csv}`` (default: ``run_dir``).
    problem: a prebuilt problem for the run's config (else built from ``config.json``).
    progress: progress bars while loading.

  Returns:
    The table dict (``fp32_top1``, ``max_loss``, ``criterion``, ``rows``).
  """
  if not 0 <= max_loss <= 1:
    raise ValueError(f"max_loss={max_loss!r} is invalid; allowed: a fraction in [0, 1]")
  cfg_path = os.path.join(run_dir, "config.json")
  front_path = os.path.join(run_dir, "front.json")
  for p in (cfg_path, front_path):
    if not os.path.exists(p):
      raise ValueError(f"run_dir={run_dir!r}: {os.path.basename(p)} is missing; allowed: a "
                       "finished `nemo-jax search` directory")
  with open(cfg_path) as f:
    cfg = load_search_config(json.load(f)["config"])
  if getattr(cfg, "library", None) is None and problem is None:
    raise ValueError(f"run_dir={run_dir!r}: the run has no library; allowed: an EMOMC run "
                     "(a search config with 'library')")
  problem = problem or build_problem(cfg, progress=progress)
  criterion = criterion or next(n for n in cfg.objectives if n not in ACCURACY_OBJECTIVES)
  if criterion not in ENERGY_NAMES + SIZE_NAMES:
    raise ValueError(f"criterion={criterion!r} is invalid; allowed: {ENERGY_NAMES + SIZE_NAMES}")

  split = cfg.final_split or "test"
  images, labels = data_lib.load_split(cfg.dataset, split, source_dir=cfg.data_dir)
  classes = data_lib.DATASETS[cfg.dataset].num_classes
  per_class = max(1, min(cfg.final_max_images // classes, int(np.bincount(labels).min())))
  idx = data_lib.stratified_subset(labels, per_class, seed=cfg.seed)
  x, y = data_lib.preprocess(cfg.dataset, images[idx]), labels[idx]
  evaluator = problem.make_evaluator(x, y)
  fp32_top1 = float(evaluator.evaluate_float().top1)
  reference = fp32_costs(problem.workload)
  L = problem.workload.num_layers

  with open(front_path) as f:
    front = json.load(f)
  emomc = choose(_front_candidates(problem, evaluator, front), fp32_top1, max_loss, criterion)

  keeps = [float(p) for p in cfg.keep_choices]
  prune_w = np.full((len(keeps), L), quant.FLOAT_BITS)
  prune_top1 = _evaluate_top1(problem, evaluator, keeps, prune_w)
  prune_costs = all_costs(problem.workload, keeps, prune_w)
  pruning = choose([{"keep": p, "w_bits": list(w), "top1": float(t), "costs": c}
                    for p, w, t, c in zip(keeps, prune_w, prune_top1, prune_costs)],
                   fp32_top1, max_loss, criterion)

  bits = list(cfg.bit_choices)
  uni_w = np.tile(np.asarray(bits)[:, None], (1, L))
  uni_top1 = _evaluate_top1(problem, evaluator, [1.0] * len(bits), uni_w)
  uni_costs = all_costs(problem.workload, [1.0] * len(bits), uni_w)
  uniform = choose([{"keep": 1.0, "w_bits": list(w), "top1": float(t), "costs": c}
                    for w, t, c in zip(uni_w, uni_top1, uni_costs)],
                   fp32_top1, max_loss, criterion)

  labels_ = ["EMOMC (pruning + quantization)", "pruning only (FP32 weights)",
             "quantization only (uniform)"]
  rows = [_row(labels_[0], emomc, reference, fp32_top1),
          _row(labels_[1], pruning, reference, fp32_top1),
          _row(labels_[2], uniform, reference, fp32_top1)]
  if quant_run is not None:
    qpath = os.path.join(quant_run, "front.json")
    if not os.path.exists(qpath):
      raise ValueError(f"quant_run={quant_run!r}: front.json is missing")
    with open(qpath) as f:
      qfront = json.load(f)
    bad = sorted({m["keep"] for m in qfront if m["keep"] != 1.0})
    if bad:
      raise ValueError(f"quant_run={quant_run!r}: keep ratios {bad} found; allowed: a "
                       "quantization-only run (keep_choices=[1.0])")
    searched = choose(_front_candidates(problem, evaluator, qfront), fp32_top1, max_loss,
                      criterion)
    labels_.append("quantization only (searched)")
    rows.append(_row(labels_[-1], searched, reference, fp32_top1))
  table = build_table(rows, fp32_top1, max_loss, criterion, labels_)
  table["fp32_costs"] = reference
  table["run_dir"] = run_dir
  write_table(table, out_dir or run_dir)
  return table
