"""Human-readable results of a search: front.json, history.csv, front.png, species.png.

``write_outputs`` is called at the end of a run; ``redraw`` (``nemo-jax report DIR``)
rebuilds the pictures and prints the front as a table from the files alone.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from typing import Sequence

import numpy as np

from nemo_jax._src.faults import write_json  # noqa: F401  (the run's JSON writer)
from nemo_jax._src.search.config import species_labels

FRONT_FILE = "front.json"
HISTORY_FILE = "history.csv"
UNIFORM_FILE = "uniform.json"
CONFIG_FILE = "config.json"


def write_history(path: str, rows: Sequence[dict]) -> None:
  """One row per generation (keys of the first row are the columns)."""
  if not rows:
    return
  cols = list(rows[0].keys())
  tmp = f"{path}.tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for r in rows:
      w.writerow(r)
  os.replace(tmp, path)


def read_history(path: str) -> list[dict]:
  with open(path) as f:
    return [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _num(v):
  try:
    f = float(v)
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
  except (TypeError, ValueError):
    return v


def plot_front(out_dir: str, front: list[dict], objectives: Sequence[str],
               uniform: list[dict] | None = None, finetuned: list[dict] | None = None,
               filename: str = "front.png") -> str:
  """2-D projections of the front (every objective pair), uniform W=A baselines overlaid.

  Args:
    out_dir: where ``filename`` is written.
    front, uniform: ``front.json`` / ``uniform.json`` entries.
    objectives: the run's objective names.
    finetuned: optional fine-tuned members (``{"member": K, "objectives": {...}}``),
      drawn as stars joined to front member ``K``.
    filename: the image's name in ``out_dir``.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  pairs = list(itertools.combinations(objectives, 2))
  fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.2), squeeze=False)
  species = sorted({m["species"] for m in front})
  colors = dict(zip(species, plt.cm.tab10.colors))
  for ax, (a, b) in zip(axes[0], pairs):
    for s in species:
      pts = np.array([[m["objectives"][a], m["objectives"][b]] for m in front
                      if m["species"] == s])
      if len(pts):
        ax.scatter(pts[:, 0], pts[:, 1], s=18, color=colors[s], label=s, alpha=0.85)
    if uniform:
      u = np.array([[m["objectives"][a], m["objectives"][b]] for m in uniform])
      ax.plot(u[:, 0], u[:, 1], "k--", lw=1, marker="x", ms=6, label="uniform W=A")
      for m in uniform:
        ax.annotate(str(m["bits"]), (m["objectives"][a], m["objectives"][b]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    for j, m in enumerate(finetuned or ()):
      p, q = front[m["member"]]["objectives"], m["objectives"]
      ax.plot([p[a], q[a]], [p[b], q[b]], "k-", lw=0.8, alpha=0.6)
      ax.scatter([q[a]], [q[b]], s=70, marker="*", color="k", zorder=3,
                 label="fine-tuned" if j == 0 else None)
    ax.set_xlabel(a)
    ax.set_ylabel(b)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.suptitle(f"Pareto front ({len(front)} configurations; all objectives minimised)")
  fig.tight_layout()
  path = os.path.join(out_dir, filename)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_species(out_dir: str, history: list[dict], species: Sequence[str]) -> str:
  """Species sizes (stacked) and hypervolume over generations."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  gens = [r["generation"] for r in history]
  sizes = np.array([[r[f"size:{s}"] for s in species] for r in history]).T
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ax1.stackplot(gens, sizes, labels=species, alpha=0.85)
  ax1.set_xlabel("generation")
  ax1.set_ylabel("members")
  ax1.set_title("species allocation")
  ax1.legend(fontsize=8, loc="upper left")
  ax2.plot(gens, [r["hypervolume"] for r in history], "k-o", ms=3)
  ax2.set_xlabel("generation")
  ax2.set_ylabel("hypervolume (normalised objectives)")
  ax2.set_title("archive hypervolume")
  ax2.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(out_dir, "species.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def front_table(front: list[dict], objectives: Sequence[str], max_rows: int = 40) -> str:
  """A plain-text table of the front (sorted by the first objective)."""
  extra = [k for k in ("selection_top1", "final_top1") if front and k in front[0]]
  head = ["#", "species", "keep", "mean w", "mean a"] + list(objectives) + extra
  rows = []
  for i, m in enumerate(front[:max_rows]):
    rows.append([str(i), m["species"], f"{m['keep']:.2f}", f"{np.mean(m['w_bits']):.2f}",
                 f"{np.mean(m['a_bits']):.2f}"]
                + [f"{m['objectives'][o]:.4g}" for o in objectives]
                + [f"{m[k]:.4f}" for k in extra])
  widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h)
            for j, h in enumerate(head)]
  fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
  lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
  if len(front) > max_rows:
    lines.append(f"... {len(front) - max_rows} more in {FRONT_FILE}")
  return "\n".join(lines)


def redraw(out_dir: str) -> str:
  """Rebuilds front.png / species.png from a run directory; returns the front table."""
  for f in (FRONT_FILE, HISTORY_FILE, CONFIG_FILE):
    if not os.path.exists(os.path.join(out_dir, f)):
      raise ValueError(f"report: {out_dir!r} is not a search output directory "
                       f"(missing {f})")
  with open(os.path.join(out_dir, FRONT_FILE)) as f:
    front = json.load(f)
  with open(os.path.join(out_dir, CONFIG_FILE)) as f:
    cfg = json.load(f)["config"]
  uniform = None
  if os.path.exists(os.path.join(out_dir, UNIFORM_FILE)):
    with open(os.path.join(out_dir, UNIFORM_FILE)) as f:
      uniform = json.load(f)
  history = read_history(os.path.join(out_dir, HISTORY_FILE))
  species = species_labels(cfg["species"])
  if front:
    plot_front(out_dir, front, cfg["objectives"], uniform)
  if history:
    plot_species(out_dir, history, species)
  return front_table(front, cfg["objectives"])
