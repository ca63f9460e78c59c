"""Search-quality metrics against hand-computed cases (nemo_jax/_src/run/quality.py)."""

from __future__ import annotations

import numpy as np
import pytest

from nemo_jax._src.run import quality

OBJ = ("top1_error", "model_ratio", "bops_ratio")


def member(sel, test, model, bops, bits=None, fit=None):
  m = {"objectives": {"top1_error": 1.0 - (sel if fit is None else fit), "model_ratio": model,
                      "bops_ratio": bops},
       "selection_top1": sel, "final_top1": test}
  if bits is not None:
    m["bits"] = bits
  return m


REFS = {"fp32": member(0.90, 0.91, 1.0, 1.0),
        "cheapest": member(0.1, 0.1, 0.0625, 0.00390625),
        "w8a8": member(0.9, 0.9, 0.25, 0.0625)}


def test_bounded_hypervolume_hand_computed_2d():
  ideal, ref = np.asarray([0.1, 0.0]), np.asarray([0.15, 1.0])
  # Scaled points (0.5, 0.5) and (0.0, 0.8): union 0.5 * 0.5 + 0.5 * 0.2 = 0.35.
  F = np.asarray([[0.125, 0.5], [0.1, 0.8]])
  assert quality.bounded_hypervolume(F, ideal, ref) == pytest.approx(0.35, abs=1e-6)
  # A member outside the box (error beyond float + drop) counts for nothing ...
  outside = np.asarray([[0.2, 0.0]])
  assert quality.bounded_hypervolume(outside, ideal, ref) == 0.0
  assert quality.bounded_hypervolume(np.concatenate([F, outside]), ideal, ref) == \
      pytest.approx(0.35, abs=1e-6)
  # ... and one better than float is clipped to the ideal, not beyond the box.
  better = np.asarray([[0.05, 0.5]])
  assert quality.bounded_hypervolume(better, ideal, ref) == pytest.approx(0.5, abs=1e-6)
  assert quality.bounded_hypervolume(np.zeros((0, 2)), ideal, ref) == 0.0


def test_drop_box_and_ceiling():
  ideal, ref = quality.drop_box(OBJ, 0.9, REFS["cheapest"]["objectives"],
                                REFS["w8a8"]["objectives"], drop=0.05)
  np.testing.assert_allclose(ideal, [0.1, 0.0625, 0.00390625])
  np.testing.assert_allclose(ref, [0.15, 0.25, 0.0625])
  # The ideal point fills the whole box; the best measured error at the cheapest costs
  # is the ceiling (here 1 point worse than float: 1 - 0.01 / 0.05 of the error axis).
  assert quality.ceiling(OBJ, 0.90, ideal, ref) == pytest.approx(1.0, abs=1e-6)
  assert quality.ceiling(OBJ, 0.89, ideal, ref) == pytest.approx(0.8, abs=1e-6)
  with pytest.raises(ValueError, match="reference is not above the ideal"):
    quality.drop_box(OBJ, 0.9, REFS["w8a8"]["objectives"], REFS["w8a8"]["objectives"])


def uniform_points():
  # Uniform W8A8, W4A4, W2A2: W2A2 is far outside the 5-point box.
  return [member(0.90, 0.905, 0.25, 0.0625, bits=8),
          member(0.885, 0.89, 0.125, 0.015625, bits=4),
          member(0.30, 0.31, 0.0625, 0.00390625, bits=2)]


def test_a_front_equal_to_the_uniform_sweep_gains_nothing():
  u = uniform_points()
  report = quality.quality_report(u, u, OBJ, REFS)
  for images in ("fitness", "selection", "test"):
    assert report["bounded_hypervolume"][images] == pytest.approx(
        report["uniform_bounded_hypervolume"][images], abs=0)
  for row in report["iso_accuracy"]:
    if row["front"] is not None:
      assert row["gain"] == pytest.approx(1.0)
  for row in report["iso_cost"]:
    assert row["test_top1"] == row["uniform_test_top1"]


def test_iso_accuracy_picks_on_selection_and_reports_test():
  u = uniform_points()
  # A mixed member: within 1 point on selection, 6x smaller than FP32, BOPs of W3A3.
  mixed = member(0.892, 0.80, 1 / 6, 0.0087890625)
  # A member that is better on test but 2 points down on selection: not admissible at 1.
  tempting = member(0.88, 0.91, 1 / 10, 0.005)
  rows = {(r["drop"], r["cost"]): r for r in quality.iso_accuracy(
      [mixed, tempting], u, {"selection": 0.90, "test": 0.91})}
  r = rows[0.01, "model_ratio"]
  assert r["front"]["factor"] == pytest.approx(6.0)
  assert r["front"]["test_top1"] == 0.80 and r["front"]["test_drop"] == pytest.approx(0.11)
  assert r["uniform"]["bits"] == 8 and r["uniform"]["factor"] == pytest.approx(4.0)
  assert r["gain"] == pytest.approx(1.5)
  r = rows[0.02, "bops_ratio"]     # now W4A4 and the tempting member qualify
  assert r["front"]["factor"] == pytest.approx(200.0)
  assert r["uniform"]["bits"] == 4 and r["uniform"]["factor"] == pytest.approx(64.0)
  assert rows[0.005, "model_ratio"]["front"] is None    # nobody within half a point


def test_iso_cost_best_member_no_costlier_than_each_uniform_point():
  u = uniform_points()
  cheap_good = member(0.895, 0.90, 0.12, 0.015)
  rows = quality.iso_cost([cheap_good], u)
  assert [r["bits"] for r in rows] == [8, 4, 2]
  assert rows[0]["test_top1"] == 0.90 and rows[1]["test_top1"] == 0.90
  assert rows[2]["test_top1"] is None            # nothing as cheap as W2A2


def test_summary_lines_name_the_headline_figures():
  u = uniform_points()
  mixed = member(0.892, 0.80, 1 / 6, 0.0087890625)
  report = quality.quality_report([mixed] + u, u, OBJ, REFS)
  text = "\n".join(quality.summary_lines(report))
  assert "drop-bounded hypervolume (test images" in text
  assert "6.0x smaller" in text and "W8A8 4.0x" in text
