"""Search quality as researchers report it: drop-bounded hypervolume, iso-accuracy
compression and iso-cost accuracy (``docs/DESIGN.md``, "Search quality").

The plain hypervolume of the normalised objectives (reference 1 everywhere) credits
useless configurations (an error of 1.0 is worse than chance) and barely sees cost
differences at low bit-widths (the BOPs axis spans 0.004 - 0.0625 of its unit range).
These metrics are read off a front instead:

* :func:`bounded_hypervolume`: every objective is normalised from an IDEAL (the float
  model's error; the cheapest configuration's costs) to a REFERENCE (the float error plus
  a tolerated drop, default 5 points; the uniform W8A8 configuration's costs). A member
  outside the box (more than ``drop`` below float, or costlier than W8A8 somewhere)
  counts for nothing; the box itself is 1, so the value is the fraction of the box the
  front dominates. Its ceiling for a problem (:func:`ceiling`) is the value of one
  point with the best error measured at the cheapest costs.
* :func:`iso_accuracy`: for drops of 0.5 / 1 / 2 / 5 points, the smallest model size and
  BOPs (as reduction factors against FP32) of a member within the drop, picked on the
  selection images and reported on the test images, next to the best uniform point's.
* :func:`iso_cost`: at the cost of each uniform point, the best member costing no more
  (picked on selection), with its test top-1 next to the uniform point's.

All functions work on member dicts (``front.json`` / ``uniform.json`` entries) whose
``objectives`` hold the run's normalised objectives and whose ``selection_top1`` /
``final_top1`` hold the held-out top-1.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from nemo_jax._src import pareto

DROPS = (0.005, 0.01, 0.02, 0.05)
"""Accuracy drops (fractions) of the iso-accuracy table."""
DEFAULT_DROP = 0.05
"""The drop the bounded hypervolume tolerates (5 points of top-1)."""
TOP1_KEYS = {"fitness": None, "selection": "selection_top1", "test": "final_top1"}
"""Image set -> the member key holding its top-1 (None: the searched error objective)."""
COSTS = ("model_ratio", "bops_ratio")
"""The cost objectives iso-accuracy reports as reduction factors."""


def top1_of(member: Mapping, images: str) -> float | None:
  """A member's top-1 on ``images`` (fitness: ``1 - top1_error`` objective), or None."""
  key = TOP1_KEYS[images]
  if key is None:
    err = member.get("metrics", {}).get("top1_error", member["objectives"].get("top1_error"))
    return None if err is None else 1.0 - float(err)
  value = member.get(key)
  return None if value is None else float(value)


def objective_matrix(members: Sequence[Mapping], objectives: Sequence[str],
                     images: str) -> np.ndarray | None:
  """``[N, M]`` objectives with ``top1_error`` taken on ``images`` (None: not measured)."""
  F = np.asarray([[float(m["objectives"][n]) for n in objectives] for m in members],
                 np.float64).reshape(len(members), len(objectives))
  if "top1_error" in objectives:
    top1 = [top1_of(m, images) for m in members]
    if any(t is None for t in top1):
      return None
    F[:, list(objectives).index("top1_error")] = 1.0 - np.asarray(top1, np.float64)
  return F


def drop_box(objectives: Sequence[str], float_top1: float, cheapest: Mapping[str, float],
             w8a8: Mapping[str, float], drop: float = DEFAULT_DROP
             ) -> tuple[np.ndarray, np.ndarray]:
  """``(ideal [M], reference [M])`` of the bounded hypervolume.

  Args:
    objectives: the run's objective names (accuracy objectives are errors).
    float_top1: the FP32 model's top-1 on the image set measured.
    cheapest, w8a8: the normalised cost objectives of the cheapest configuration and of
      uniform W8A8.
    drop: the tolerated top-1 drop (fraction).
  """
  ideal, ref = [], []
  for n in objectives:
    if n in ("top1_error", "top5_error"):
      ideal.append(1.0 - float_top1)
      ref.append(1.0 - float_top1 + drop)
    else:
      ideal.append(float(cheapest[n]))
      ref.append(float(w8a8[n]))
  ideal, ref = np.asarray(ideal, np.float64), np.asarray(ref, np.float64)
  if np.any(ref <= ideal):
    bad = [n for n, lo, hi in zip(objectives, ideal, ref) if hi <= lo]
    raise ValueError(f"drop_box: the reference is not above the ideal for {bad}; allowed: "
                     "drop > 0 and W8A8 costlier than the cheapest configuration")
  return ideal, ref


def bounded_hypervolume(F: np.ndarray, ideal: np.ndarray, reference: np.ndarray) -> float:
  """Hypervolume of ``F [N, M]`` in the box ``[ideal, reference]``, as a fraction of it.

  Every objective is mapped to ``(f - ideal) / (reference - ideal)`` (below the ideal:
  0, e.g. a member more accurate than the float model); a member outside the box on any
  objective adds nothing.
  """
  F = np.asarray(F, np.float64)
  if not len(F):
    return 0.0
  scaled = np.maximum((F - ideal) / (reference - ideal), 0.0)
  inside = np.all(scaled < 1.0, axis=1) & np.all(np.isfinite(scaled), axis=1)
  if not inside.any():
    return 0.0
  return float(pareto.hypervolume(jnp.asarray(scaled[inside], jnp.float32),
                                  jnp.ones(F.shape[1], jnp.float32)))


def ceiling(objectives: Sequence[str], best_top1: float, ideal: np.ndarray,
            reference: np.ndarray) -> float:
  """The bounded hypervolume of ONE point: the best top-1 measured (any configuration,
  FP32 included) at the cheapest configuration's costs. No front can exceed it."""
  point = np.asarray(ideal, np.float64).copy()
  for j, n in enumerate(objectives):
    if n in ("top1_error", "top5_error"):
      point[j] = 1.0 - best_top1
  return bounded_hypervolume(point[None], ideal, reference)


def _factor(x: float) -> float:
  return float(1.0 / x) if x > 0 else float("inf")


def _pick(members, float_sel: float, drop: float, key: str):
  """The member within ``drop`` of float on selection with the smallest ``key`` cost."""
  ok = [m for m in members if top1_of(m, "selection") is not None
        and top1_of(m, "selection") >= float_sel - drop - 1e-12]
  if not ok:
    return None
  return min(ok, key=lambda m: (m["objectives"][key], -top1_of(m, "selection")))


def iso_accuracy(front: Sequence[Mapping], uniform: Sequence[Mapping], float_top1: Mapping,
                 drops: Sequence[float] = DROPS) -> list[dict]:
  """Per drop and cost, the cheapest member within the drop (picked on selection).

  Args:
    front, uniform: members with ``selection_top1`` and ``final_top1``.
    float_top1: ``{"selection": ..., "test": ...}`` of the FP32 model.
    drops: top-1 drops (fractions).

  Returns:
    One row per (drop, cost): ``drop``, ``cost``, ``front`` / ``uniform`` (each None or
    ``{"factor": FP32 cost / cost, "selection_top1", "test_top1", "test_drop", "bits"}``)
    and ``gain`` (front factor / uniform factor, None when either is missing).
  """
  rows = []
  for drop in drops:
    for cost in COSTS:
      row = {"drop": drop, "cost": cost}
      for name, pool in (("front", front), ("uniform", uniform)):
        if not pool or cost not in pool[0]["objectives"]:
          row[name] = None
          continue
        m = _pick(pool, float_top1["selection"], drop, cost)
        row[name] = None if m is None else {
            "factor": _factor(m["objectives"][cost]),
            "selection_top1": top1_of(m, "selection"), "test_top1": top1_of(m, "test"),
            "test_drop": (None if top1_of(m, "test") is None or "test" not in float_top1
                          else float_top1["test"] - top1_of(m, "test")),
            "bits": m.get("bits")}
      f, u = row["front"], row["uniform"]
      row["gain"] = None if f is None or u is None else f["factor"] / u["factor"]
      rows.append(row)
  return rows


def iso_cost(front: Sequence[Mapping], uniform: Sequence[Mapping]) -> list[dict]:
  """At each uniform point's costs, the best member costing no more (picked on selection).

  Returns:
    One row per uniform point: ``bits``, its ``uniform_test_top1`` and the chosen
    member's ``test_top1`` / ``selection_top1`` (None when no member is that cheap).
  """
  rows = []
  for u in uniform:
    costs = [c for c in COSTS if c in u["objectives"]]
    ok = [m for m in front if top1_of(m, "selection") is not None and all(
        m["objectives"][c] <= u["objectives"][c] + 1e-12 for c in costs)]
    best = max(ok, key=lambda m: top1_of(m, "selection")) if ok else None
    rows.append({"bits": u.get("bits"), "uniform_test_top1": top1_of(u, "test"),
                 "uniform_selection_top1": top1_of(u, "selection"),
                 "test_top1": None if best is None else top1_of(best, "test"),
                 "selection_top1": None if best is None else top1_of(best, "selection")})
  return rows


def quality_report(front: Sequence[Mapping], uniform: Sequence[Mapping],
                   objectives: Sequence[str], references: Mapping[str, Mapping],
                   drop: float = DEFAULT_DROP) -> dict:
  """Every metric of a run's front on every image set measured.

  Args:
    front, uniform: member dicts (uniform ones carry ``bits``).
    objectives: the run's objective names.
    references: ``{"fp32": member, "cheapest": member, "w8a8": member}`` (member dicts:
      the FP32 model's top-1 per image set, the cost objectives of the cheapest
      configuration and of uniform W8A8).
    drop: the bounded hypervolume's tolerated drop.

  Returns:
    ``{"drop": ..., "float_top1": {set: top1}, "bounded_hypervolume": {set: value},
    "uniform_bounded_hypervolume": {set: value}, "ceiling": {set: value},
    "iso_accuracy": [...], "iso_cost": [...]}``; sets without measurements are left out.
  """
  fp32, cheapest, w8a8 = (references[k] for k in ("fp32", "cheapest", "w8a8"))
  out = {"drop": drop, "float_top1": {}, "bounded_hypervolume": {},
         "uniform_bounded_hypervolume": {}, "ceiling": {}}
  for images in TOP1_KEYS:
    float_top1 = top1_of(fp32, images)
    F = objective_matrix(front, objectives, images) if front else np.zeros((0, len(objectives)))
    U = objective_matrix(uniform, objectives, images) if uniform else None
    if float_top1 is None or F is None:
      continue
    try:
      ideal, ref = drop_box(objectives, float_top1, cheapest["objectives"],
                            w8a8["objectives"], drop)
    except ValueError as e:   # a custom cost that is not cheaper at fewer bits
      out["note"] = f"no drop-bounded hypervolume: {e}"
      break
    out["float_top1"][images] = float_top1
    out["bounded_hypervolume"][images] = bounded_hypervolume(F, ideal, ref)
    if U is not None:
      out["uniform_bounded_hypervolume"][images] = bounded_hypervolume(U, ideal, ref)
    tops = [float_top1] + [t for t in (top1_of(m, images) for m in list(front) + list(uniform))
                           if t is not None]
    out["ceiling"][images] = ceiling(objectives, max(tops), ideal, ref)
  if "selection" in out["float_top1"]:
    out["iso_accuracy"] = iso_accuracy(front, uniform, out["float_top1"])
    out["iso_cost"] = iso_cost(front, uniform)
  return out


def summary_lines(report: Mapping) -> list[str]:
  """The headline figures of :func:`quality_report` as short lines for the terminal."""
  lines = []
  hv = report.get("bounded_hypervolume", {})
  images = "test" if "test" in hv else ("selection" if "selection" in hv else "fitness")
  if images in hv:
    u = report.get("uniform_bounded_hypervolume", {}).get(images)
    c = report.get("ceiling", {}).get(images)
    lines.append(f"drop-bounded hypervolume ({images} images, drop <= "
                 f"{100 * report['drop']:.0f} points): {hv[images]:.4f}"
                 + (f" (uniform sweep {u:.4f}" if u is not None else "")
                 + (f", ceiling {c:.4f})" if c is not None else ")" if u is not None else ""))
  for row in report.get("iso_accuracy", []):
    if row["drop"] != 0.01 or row["front"] is None:
      continue
    f, u = row["front"], row["uniform"]
    what = "smaller" if row["cost"] == "model_ratio" else "fewer BOPs"
    text = (f"at <= 1 point (picked on selection): {f['factor']:.1f}x {what} "
            f"(test top-1 {100 * f['test_top1']:.2f}%)" if f["test_top1"] is not None else
            f"at <= 1 point (picked on selection): {f['factor']:.1f}x {what}")
    if u is not None:
      text += f"; best uniform W{u['bits']}A{u['bits']} {u['factor']:.1f}x"
    lines.append(text)
  return lines
