"""Pictures and tables of a run: front.png, species.png and the front as text.

``write_outputs`` (``search.py``) draws them at the end of a run; ``redraw``
(``nemo-jax report DIR``) rebuilds them from the run directory's files alone.
"""

from __future__ import annotations

import itertools
import os
from typing import Sequence

import numpy as np

from nemo_jax._src.run.rundir import FRONT_FILE, HISTORY_FILE, RunDir
from nemo_jax._src.search.config import species_labels


def _pyplot():
  # matplotlib loads on the first picture, with a non-interactive backend chosen then
  # (not at ``import nemo_jax``, where it would override a notebook's backend).
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


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
  plt = _pyplot()
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
  plt = _pyplot()
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
  """Rebuilds front.png / species.png from a run directory; returns the front table.

  Raises:
    ValueError naming the directory and the missing or unreadable file.
  """
  return redraw_files(out_dir)[0]


def redraw_files(out_dir: str) -> tuple[str, list[str]]:
  """:func:`redraw`, also returning the pictures it drew (none for an empty front or
  history).

  Raises:
    ValueError naming the directory, the file and what is wrong in it.
  """
  run = RunDir(out_dir)
  run.require(FRONT_FILE, HISTORY_FILE, "config.json", what="a search output directory")
  cfg = run.read_config()
  front = [m.to_dict() for m in run.read_front()]
  uniform = run.read_uniform()
  history = run.read_history()
  species = species_labels(cfg.search.species)
  objectives = cfg.problem.objectives
  for name, members in ((FRONT_FILE, front), ("uniform.json",
                                             [m.to_dict() for m in uniform or ()])):
    for i, m in enumerate(members):
      missing = [o for o in objectives if o not in m["objectives"]]
      if missing:
        raise ValueError(f"run_dir={out_dir!r}: {name}[{i}] lacks the objective(s) "
                         f"{missing} of the run's config.json; allowed: the {name} "
                         "written by this run")
  columns = ["generation", "hypervolume"] + [f"size:{s}" for s in species]
  for i, row in enumerate(history):
    bad = [c for c in columns if not isinstance(row.get(c), (int, float))]
    if bad:
      raise ValueError(f"run_dir={out_dir!r}: {HISTORY_FILE} row {i + 1} lacks numeric "
                       f"column(s) {bad}; allowed: the history.csv written by nemo-jax "
                       "search")
  drawn = []
  if front:
    drawn.append(plot_front(out_dir, front, objectives,
                            None if uniform is None else [m.to_dict() for m in uniform]))
  if history:
    drawn.append(plot_species(out_dir, history, species))
  return front_table(front, objectives), drawn
