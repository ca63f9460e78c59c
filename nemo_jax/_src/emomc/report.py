"""The EMOMC results table: energy improvement and size compression at <= 0.5% loss.

For a finished EMOMC search (``nemo-jax search`` with a library) the table lists, against
the uncompressed FP32 model (dense, float32 weights, ``energy`` and ``size`` with
32-bit weights and keep 1):

* ``EMOMC``: the chosen front member: among the members whose top-1 on the selection
  set is at most ``max_loss`` (default 0.5 percentage points) below the FP32 model's on
  the same images, the one with the smallest ``criterion`` (default: the search's first
  cost objective);
* ``pruning only``: the library models (every searched keep ratio) with float32
  weights, chosen the same way;
* ``quantization only (uniform)``: the dense model (p = 1) with every weight at the same
  bit-width, for each ``bit_choices`` value, chosen the same way;
* ``quantization only (searched)``: optionally, the front of a second search on the same
  library with ``keep_choices=[1.0]``, chosen the same way.

The selection set is the run's held-out ``eval_split`` images (``selection_per_class``,
disjoint from the fitness images; ``docs/DESIGN.md``, "Image sets"), so the choice is
made out of sample; the final split (the test set) is only reported: each row's
``top1`` / ``accuracy_loss`` are test figures, ``selection_top1`` / ``selection_loss``
the ones it was chosen on. A run without a selection set (``selection_per_class=0``)
chooses on the test set, and the table says so (``selected_on``).

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
from nemo_jax._src import quant
from nemo_jax._src.problem import ACCURACY_OBJECTIVES, capped_split, selection_data
from nemo_jax._src.faults import check_output_file, write_atomic
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.run.rundir import CONFIG_FILE, FRONT_FILE, RunDir
from nemo_jax._src.run.search import build_problem

DEFAULT_MAX_LOSS = 0.005
TABLE_JSON = "emomc_table.json"
TABLE_CSV = "emomc_table.csv"
ENERGY_NAMES = tuple(f"energy:{d}" for d in costs_lib.DATAFLOWS)
SIZE_NAMES = tuple(f"size_kb:{c}" for c in costs_lib.CODINGS)
SELECTION_KEY = "selection_top1"
"""The accuracy a row is chosen on (a front member's top-1 on the selection set)."""


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
              fp32_top1: float, keep: float | None = None, w_bits=None,
              selection_top1: float | None = None,
              fp32_selection_top1: float | None = None) -> dict:
  """One table row: improvements (x) over ``reference`` and the accuracy losses.

  ``top1`` / ``fp32_top1`` are on the test set (reported), ``selection_top1`` /
  ``fp32_selection_top1`` on the selection set (what the row was chosen on; optional).
  """
  selection_loss = (None if selection_top1 is None or fp32_selection_top1 is None
                    else fp32_selection_top1 - selection_top1)
  return {
      "method": method, "keep": keep,
      "w_bits": None if w_bits is None else [int(b) for b in w_bits],
      "top1": top1, "accuracy_loss": None if top1 is None else fp32_top1 - top1,
      "selection_top1": selection_top1, "selection_loss": selection_loss,
      "energy_x": {n.split(":", 1)[1]: reference[n] / costs[n] for n in ENERGY_NAMES},
      "size_x": {n.split(":", 1)[1]: reference[n] / costs[n] for n in SIZE_NAMES},
      "costs": dict(costs)}


def choose(candidates: Sequence[dict], fp32_top1: float, max_loss: float,
           criterion: str, key: str = "top1") -> dict | None:
  """The candidate with the smallest ``criterion`` cost among those within ``max_loss``.

  Args:
    candidates: dicts with ``costs`` and the accuracy ``key``.
    fp32_top1: the FP32 model's accuracy on the images ``key`` was measured on.
    max_loss: the largest admissible ``fp32_top1 - c[key]``.
    criterion: the cost minimised.
    key: the accuracy chosen on (the report: ``selection_top1``, the selection set).

  Returns:
    The chosen candidate (ties go to the higher ``key`` accuracy), or None.
  """
  ok = [c for c in candidates if c.get(key) is not None and np.isfinite(c[key])
        and c[key] >= fp32_top1 - max_loss - 1e-12]
  if not ok:
    return None
  return min(ok, key=lambda c: (c["costs"][criterion], -c[key]))


def build_table(rows: Sequence[dict | None], fp32_top1: float, max_loss: float,
                criterion: str, labels: Sequence[str],
                fp32_selection_top1: float | None = None,
                selected_on: str = "selection") -> dict:
  """Assembles the table dict (rows that found no candidate are reported as such).

  ``fp32_top1`` is the FP32 model's test top-1, ``fp32_selection_top1`` its top-1 on
  the images the rows were chosen on (``selected_on``).
  """
  out_rows = []
  for label, row in zip(labels, rows):
    out_rows.append(row if row is not None else {"method": label, "keep": None,
                                                 "w_bits": None, "top1": None,
                                                 "accuracy_loss": None,
                                                 "selection_top1": None,
                                                 "selection_loss": None, "energy_x": None,
                                                 "size_x": None, "costs": None,
                                                 "note": f"no candidate within {max_loss:.2%}"})
  return {"fp32_top1": fp32_top1, "fp32_selection_top1": fp32_selection_top1,
          "selected_on": selected_on, "max_loss": max_loss, "criterion": criterion,
          "rows": out_rows}


def format_table(table: dict) -> str:
  """Text version of the table (improvements as ``12.3x``)."""
  dfs = list(costs_lib.DATAFLOWS)
  cds = list(costs_lib.CODINGS)
  head = (f"{'method':<30} {'keep':>5} {'sel':>7} {'top1':>7} {'loss':>6} | "
          + " ".join(f"{'E ' + d:>9}" for d in dfs) + " | "
          + " ".join(f"{'S ' + c:>8}" for c in cds))
  sel_fp32 = table.get("fp32_selection_top1")
  on = table.get("selected_on", "test")
  lines = [f"EMOMC table: FP32 top-1 {100 * table['fp32_top1']:.2f}% (test)"
           + (f", {100 * sel_fp32:.2f}% ({on})" if sel_fp32 is not None else "")
           + f", max loss {100 * table['max_loss']:.2f}% on {on}, chosen by min "
           f"{table['criterion']}; sel = top-1 on {on}, top1 / loss on test", head,
           "-" * len(head)]
  for r in table["rows"]:
    if r.get("energy_x") is None:
      lines.append(f"{r['method']:<30} {r.get('note', '')}")
      continue
    keep = f"{r['keep']:.2f}" if r["keep"] is not None else "-"
    sel = (f"{100 * r['selection_top1']:>6.2f}%" if r.get("selection_top1") is not None
           else f"{'-':>7}")
    lines.append(f"{r['method']:<30} {keep:>5} {sel} {100 * r['top1']:>6.2f}% "
                 f"{100 * r['accuracy_loss']:>5.2f}% | "
                 + " ".join(f"{r['energy_x'][d]:>8.2f}x" for d in dfs) + " | "
                 + " ".join(f"{r['size_x'][c]:>7.2f}x" for c in cds))
  return "\n".join(lines)


def write_table(table: dict, out_dir: str) -> tuple[str, str]:
  """Writes ``emomc_table.json`` and ``emomc_table.csv`` into ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  jpath, cpath = os.path.join(out_dir, TABLE_JSON), os.path.join(out_dir, TABLE_CSV)
  write_atomic(jpath, lambda f: json.dump(table, f, indent=1), mode="w")
  write_atomic(cpath, lambda f: _write_csv(f, table), mode="w")
  return jpath, cpath


def _write_csv(f, table: dict) -> None:
  cols = (["method", "keep", "selection_top1", "selection_loss", "top1", "accuracy_loss"]
          + [f"energy_x:{d}" for d in costs_lib.DATAFLOWS]
          + [f"size_x:{c}" for c in costs_lib.CODINGS] + ["w_bits"])
  w = csv.writer(f)
  w.writerow(cols)
  for r in table["rows"]:
    ex, sx = r.get("energy_x") or {}, r.get("size_x") or {}
    w.writerow([r["method"], r["keep"], r.get("selection_top1"), r.get("selection_loss"),
                r["top1"], r["accuracy_loss"]]
               + [ex.get(d) for d in costs_lib.DATAFLOWS]
               + [sx.get(c) for c in costs_lib.CODINGS]
               + [" ".join(map(str, r["w_bits"])) if r["w_bits"] else ""])


# --------------------------------------------------------------------------- from a run


def _evaluate_top1(problem, evaluator, keep, w_bits) -> np.ndarray:
  """Top-1 of configurations ``[P]`` in chunks of the population size."""
  keep = np.asarray(keep, np.float64)
  w = np.asarray(w_bits)
  out = []
  step = problem.population
  for s in range(0, len(keep), step):
    configs = problem.configs(keep[s:s + step], w[s:s + step])
    out.append(np.asarray(evaluator.run(configs).top1, np.float64))
  return np.concatenate(out) if out else np.zeros((0,))


def _candidates(problem, evaluators: dict, members: list[dict]) -> list[dict]:
  """``{keep, w_bits, top1 (test), selection_top1, costs}`` of members (``front.json``
  entries or ``{keep, w_bits}``); accuracies a member lacks are measured (in place)."""
  for key, evaluator in evaluators.items():
    missing = [m for m in members if key not in m]
    if missing:
      top1 = _evaluate_top1(problem, evaluator, [m["keep"] for m in missing],
                            [m["w_bits"] for m in missing])
      for m, t in zip(missing, top1):
        m[key] = float(t)
  costs = all_costs(problem.workload, [m["keep"] for m in members],
                    [m["w_bits"] for m in members])
  return [{"keep": m["keep"], "w_bits": list(m["w_bits"]), "top1": m["final_top1"],
           "selection_top1": m[SELECTION_KEY], "costs": c} for m, c in zip(members, costs)]


def _row(label, cand, reference, fp32):
  if cand is None:
    return None
  return table_row(label, cand["costs"], reference, cand["top1"], fp32["final_top1"],
                   cand["keep"], cand["w_bits"], cand["selection_top1"], fp32[SELECTION_KEY])


def emomc_report(run_dir: str, quant_run: str | None = None,
                 max_loss: float = DEFAULT_MAX_LOSS, criterion: str | None = None,
                 out_dir: str | None = None, problem=None, progress: bool = False,
                 overwrite: bool = False) -> dict:
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
    overwrite: replace an existing table in ``out_dir`` (default: refuse).

  Returns:
    The table dict (``fp32_top1`` on the test set, ``fp32_selection_top1`` on the
    images the rows were chosen on, ``selected_on``, ``max_loss``, ``criterion``,
    ``rows``).
  """
  if not 0 <= max_loss <= 1:
    raise ValueError(f"max_loss={max_loss!r} is invalid; allowed: a fraction in [0, 1]")
  run = RunDir(run_dir)
  run.require(CONFIG_FILE, FRONT_FILE)
  target = out_dir or run_dir
  # Before any work: the table replaces nothing unasked and its directory takes files.
  for name in (TABLE_JSON, TABLE_CSV):
    check_output_file(os.path.join(target, name), overwrite, "out")
  if os.path.realpath(target) != os.path.realpath(run_dir):
    return _report(run, quant_run, max_loss, criterion, target, problem, progress)
  with run.lock("nemo-jax emomc-report", "run_dir", create=False):
    return _report(run, quant_run, max_loss, criterion, target, problem, progress)


def _report(run: RunDir, quant_run, max_loss, criterion, target, problem, progress) -> dict:
  """:func:`emomc_report` with its output checked (and the run locked when written)."""
  run_dir = run.path
  cfg = run.read_config()
  if cfg.problem.library is None and problem is None:
    raise ValueError(f"run_dir={run_dir!r}: the run has no library; allowed: an EMOMC run "
                     "(a search config with 'library')")
  problem = problem or build_problem(cfg, progress=progress)
  criterion = criterion or next(n for n in cfg.problem.objectives
                                if n not in ACCURACY_OBJECTIVES)
  if criterion not in ENERGY_NAMES + SIZE_NAMES:
    raise ValueError(f"criterion={criterion!r} is invalid; allowed: {ENERGY_NAMES + SIZE_NAMES}")

  split = cfg.run.final_split or "test"
  x, y = capped_split(cfg.problem, split, cfg.run.final_max_images, cfg.image_seed)
  evaluators = {"final_top1": problem.make_evaluator(np.asarray(x), y)}
  selection = selection_data(cfg.problem, cfg.image_seed, cfg.run.selection_per_class,
                             held_out=problem.held_out)
  if selection is None:   # no selection set: choose on the test set (and say so)
    evaluators[SELECTION_KEY], selected_on = evaluators["final_top1"], split
  else:
    evaluators[SELECTION_KEY], selected_on = problem.make_evaluator(*selection), "selection"
  fp32 = {k: float(e.evaluate_float().top1) for k, e in evaluators.items()}
  reference = fp32_costs(problem.workload)
  L = problem.workload.num_layers

  def chosen(members):
    return choose(_candidates(problem, evaluators, members), fp32[SELECTION_KEY], max_loss,
                  criterion, key=SELECTION_KEY)

  front = [m.to_dict() for m in run.read_front()]
  emomc = chosen(front)
  keeps = [float(p) for p in cfg.problem.keep_choices]
  pruning = chosen([{"keep": p, "w_bits": [quant.FLOAT_BITS] * L} for p in keeps])
  uniform = chosen([{"keep": 1.0, "w_bits": [int(b)] * L} for b in cfg.problem.bit_choices])

  labels_ = ["EMOMC (pruning + quantization)", "pruning only (FP32 weights)",
             "quantization only (uniform)"]
  rows = [_row(labels_[0], emomc, reference, fp32),
          _row(labels_[1], pruning, reference, fp32),
          _row(labels_[2], uniform, reference, fp32)]
  if quant_run is not None:
    quant_dir = RunDir(quant_run)
    quant_dir.require(FRONT_FILE)
    qfront = [m.to_dict() for m in quant_dir.read_front()]
    bad = sorted({m["keep"] for m in qfront if m["keep"] != 1.0})
    if bad:
      raise ValueError(f"quant_run={quant_run!r}: keep ratios {bad} found; allowed: a "
                       "quantization-only run (keep_choices=[1.0])")
    labels_.append("quantization only (searched)")
    rows.append(_row(labels_[-1], chosen(qfront), reference, fp32))
  table = build_table(rows, fp32["final_top1"], max_loss, criterion, labels_,
                      fp32[SELECTION_KEY], selected_on)
  table["fp32_costs"] = reference
  table["run_dir"] = run_dir
  write_table(table, target)
  return table
