"""Per-quantizer sensitivity: every searched quantizer alone at every bit-width.

Which layers are sensitive is what users of NNCF, AIMET and TensorRT ask first, and the
search can use it (issue 25). :func:`sensitivity` scores, on the problem's fitness
images, the configuration with ONE searched quantizer at bit-width ``b`` and every other
at the base (8 bits; float with ``base_bits=32``), for every searched quantizer and
every ``b`` of ``bit_choices`` below the base: one batched evaluation through the
problem's evaluator (its compiled function and its cache), so each entry is exactly what
the evaluator gives that configuration alone (``tests/test_sensitivity.py``).

The result is cached by fingerprint (variables, calibration and tables, images, quantizer
settings, choices, base) like the calibration tables, written as ``sensitivity.json``
plus a heat map ``sensitivity.png`` into every search run, and is what ``nemo-jax
sensitivity`` prints.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nemo_jax._src import calibration as calib_lib
from nemo_jax._src.faults import write_json
from nemo_jax._src.problem import Problem
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.workload import KIND_WEIGHT

SENSITIVITY_FORMAT = "nemo_jax.sensitivity.v1"
SENSITIVITY_FILE = "sensitivity.json"
SENSITIVITY_PLOT = "sensitivity.png"


def node_names(problem: Problem) -> list[str]:
  """``w:<layer>`` / ``a:<activation quantizer>`` of every workload node (trace order)."""
  wl = problem.workload
  return [f"w:{wl.layer_names[i]}" if k == KIND_WEIGHT else f"a:{wl.act_names[i]}"
          for k, i in zip(wl.node_kind.tolist(), wl.node_index.tolist())]


def probe_configs(problem: Problem, base_bits: int = 8) -> tuple[QuantConfig, np.ndarray,
                                                                   np.ndarray]:
  """Every searched node alone at every bit choice below the base, the rest at the base.

  Returns:
    ``(configs [N * B] plus the base configuration last, node index [N * B], bits
    [N * B])`` with N searched nodes (gene order) and B bit choices below the base.
  """
  space, cfg = problem.space, problem.cfg
  bits = [b for b in cfg.bit_choices if b < base_bits]
  active = np.asarray(space.active_nodes)
  base = np.full(space.num_nodes, cfg.act_fill_bits, np.int32)
  base[active] = base_bits
  rows, nodes, probe_bits = [], [], []
  for n in active:
    for b in bits:
      row = base.copy()
      row[n] = b
      rows.append(row)
      nodes.append(int(n))
      probe_bits.append(int(b))
  rows.append(base)
  node_bits = jnp.asarray(np.stack(rows))
  w_bits, a_bits = problem.workload.split_node_bits(node_bits)
  keep = jnp.full((len(rows),), max(cfg.keep_choices), jnp.float32)
  return (QuantConfig(w_bits=w_bits, a_bits=a_bits, keep=keep), np.asarray(nodes, np.int32),
          np.asarray(probe_bits, np.int32))


def fingerprint(problem: Problem, base_bits: int) -> str:
  """SHA-256 (16 hex) of everything a sensitivity table depends on: the evaluated weights,
  the fitness images, the calibration and its tables, the quantizers, the searched nodes,
  the choices and the base."""
  h = hashlib.sha256()
  h.update(SENSITIVITY_FORMAT.encode())
  for leaf in jax.tree.leaves(problem.source.variables):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  cal = problem.calibration
  if cal is not None:
    h.update(np.asarray(cal.lo).tobytes() + np.asarray(cal.hi).tobytes())
  tables = getattr(problem.evaluator.prepared, "tables", None)
  settings = (problem.evaluator.images_fingerprint, problem.cfg.quant,
              tuple(problem.cfg.bit_choices), max(problem.cfg.keep_choices), base_bits,
              problem.cfg.act_fill_bits, problem.source.kind,
              None if tables is None else tables.fingerprint, problem.space.active_nodes,
              problem.workload.layer_names, problem.workload.act_names)
  h.update(repr(settings).encode())
  return h.hexdigest()[:16]


def compute(problem: Problem, base_bits: int = 8, progress: bool = False) -> dict:
  """The sensitivity table of a problem (module docstring).

  Returns:
    ``{"format", "base_bits", "base_top1", "bits" [B], "nodes" [N names], "kinds"
    ["w" | "a"], "node_index" [N], "top1" [N][B], "drop" [N][B] (base - top1, points
    as fractions), "images"}``.

  Raises:
    ValueError: ``base_bits`` is not above every bit choice it probes (at least one).
  """
  if not problem.needs_accuracy:
    raise ValueError("sensitivity: the problem has no accuracy objective; allowed: a "
                     "problem with top1_error or top5_error")
  bits = [b for b in problem.cfg.bit_choices if b < base_bits]
  if not bits:
    raise ValueError(f"base_bits={base_bits!r} is invalid; allowed: a bit-width above the "
                     f"smallest bit choice {min(problem.cfg.bit_choices)}")
  configs, nodes, probe_bits = probe_configs(problem, base_bits)
  total = len(nodes) + 1
  step = problem.population
  top1 = np.zeros(total, np.float64)
  with tqdm(total=total, disable=not progress, desc="sensitivity", unit="config") as bar:
    for start in range(0, total, step):
      chunk = jax.tree.map(lambda x: x[start:start + step], configs)
      errors = problem.accuracy(chunk, pad_to=problem.evaluator.padded_size(step))
      top1[start:start + step] = 1.0 - errors["top1_error"]
      bar.update(min(step, total - start))
  base_top1 = float(top1[-1])
  active = list(problem.space.active_nodes)
  names = node_names(problem)
  table = top1[:-1].reshape(len(active), len(bits))
  kinds = ["w" if int(problem.workload.node_kind[n]) == KIND_WEIGHT else "a" for n in active]
  return {"format": SENSITIVITY_FORMAT, "base_bits": int(base_bits), "base_top1": base_top1,
          "bits": [int(b) for b in bits], "nodes": [names[n] for n in active],
          "kinds": kinds, "node_index": [int(n) for n in active],
          "top1": table.tolist(), "drop": (base_top1 - table).tolist(),
          "images": int(problem.evaluator.num_images)}


def load_or_compute(problem: Problem, base_bits: int = 8, progress: bool = False,
                    path: str | None = None) -> dict:
  """The cached table (``calibration.cache_dir()/<fingerprint>.sensitivity.json``) if its
  fingerprint matches, else :func:`compute` (written to the cache)."""
  expected = fingerprint(problem, base_bits)
  if path is None:
    path = os.path.join(calib_lib.cache_dir(), f"{expected}.sensitivity.json")

  def load(p):
    with open(p) as f:
      return json.load(f)

  def save(p, table):
    os.makedirs(os.path.dirname(p), exist_ok=True)
    write_json(p, table)

  def fresh():
    return {**compute(problem, base_bits, progress), "fingerprint": expected}

  try:
    cached = load(path)
    if cached.get("fingerprint") == expected and cached.get("format") == SENSITIVITY_FORMAT:
      return cached
  except (OSError, ValueError):
    pass
  table = fresh()
  try:
    save(path, table)
  except OSError:
    pass   # a read-only cache: recomputed next time
  return table


def ranking(table: Mapping, at_bits: int | None = None) -> list[tuple[str, float]]:
  """Nodes by their top-1 drop at ``at_bits`` (default: the lowest probed), worst first."""
  j = 0 if at_bits is None else table["bits"].index(at_bits)
  drops = [(name, float(row[j])) for name, row in zip(table["nodes"], table["drop"])]
  return sorted(drops, key=lambda x: -x[1])


def plot(table: Mapping, path: str) -> str:
  """A heat map of the top-1 drop, quantizers (trace order) x bit-widths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  drop = 100.0 * np.asarray(table["drop"], np.float64)
  n = drop.shape[0]
  fig, ax = plt.subplots(figsize=(2.0 + 0.55 * len(table["bits"]), 1.5 + 0.18 * n))
  im = ax.imshow(drop, aspect="auto", cmap="magma_r", vmin=0.0, vmax=max(1.0, drop.max()))
  ax.set_xticks(range(len(table["bits"])), [str(b) for b in table["bits"]])
  ax.set_yticks(range(n), table["nodes"], fontsize=6)
  ax.set_xlabel("bit-width of this quantizer alone")
  ax.set_title(f"top-1 drop (points) against all at {table['base_bits']} bits "
               f"({100 * table['base_top1']:.2f}%, {table['images']} images)", fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.04)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write(out_dir: str, table: Mapping) -> tuple[str, str]:
  """``sensitivity.json`` and ``sensitivity.png`` into ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, SENSITIVITY_FILE)
  write_json(json_path, dict(table))
  return json_path, plot(table, os.path.join(out_dir, SENSITIVITY_PLOT))


def format_table(table: Mapping, rows: int = 12) -> str:
  """The most sensitive quantizers as text (drop at every probed bit-width)."""
  head = ["quantizer"] + [f"{b} bits" for b in table["bits"]]
  order = [name for name, _ in ranking(table)][:rows]
  index = {n: i for i, n in enumerate(table["nodes"])}
  body = [[n] + [f"{100 * d:+.2f}" for d in table["drop"][index[n]]] for n in order]
  widths = [max(len(r[j]) for r in [head] + body) for j in range(len(head))]
  fmt = lambda r: "  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                            for j, (c, w) in enumerate(zip(r, widths)))
  lines = [f"top-1 drop (points) of each quantizer alone, the rest at {table['base_bits']} "
           f"bits ({100 * table['base_top1']:.2f}% top-1 on {table['images']} images); "
           f"most sensitive first:", fmt(head)] + [fmt(r) for r in body]
  if len(table["nodes"]) > rows:
    lines.append(f"... {len(table['nodes']) - rows} more in {SENSITIVITY_FILE}")
  return "\n".join(lines)
