"""Out-of-sample front hypervolumes (nemo_jax/_src/search/run.py) and the baseline
comparison script (experiments/compare_baselines.py): hand-computed cases, then one tiny
end-to-end run and a merge."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import types

import numpy as np
import pytest

import nemo_jax
from tests.conftest import REPO, SMOKE

_spec = importlib.util.spec_from_file_location(
    "compare_baselines", os.path.join(REPO, "experiments", "compare_baselines.py"))
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

TWO_D = types.SimpleNamespace(objectives=("top1_error", "model_ratio"), hv_ref=None)


def _member(error, ratio, **keys):
  return {"objectives": {"top1_error": error, "model_ratio": ratio}, **keys}


def test_front_hypervolume_by_hand():
  members = [_member(0.2, 0.5, selection_top1=0.7, final_top1=0.6),
             _member(0.4, 0.2, selection_top1=0.5, final_top1=0.3)]
  # Reference (1, 1). Fitness: (0.2, 0.5), (0.4, 0.2):
  #   (1 - 0.2)(1 - 0.5) + (1 - 0.4)(0.5 - 0.2) = 0.40 + 0.18.
  assert nemo_jax.front_hypervolume(members, TWO_D) == pytest.approx(0.58, abs=1e-6)
  # Selection errors 0.3 and 0.5: 0.7 * 0.5 + 0.5 * 0.3.
  assert nemo_jax.front_hypervolume(members, TWO_D, "selection") == pytest.approx(0.50, abs=1e-6)
  # Test errors 0.4 and 0.7: 0.6 * 0.5 + 0.3 * 0.3.
  assert nemo_jax.front_hypervolume(members, TWO_D, "test") == pytest.approx(0.39, abs=1e-6)
  F = nemo_jax.front_objectives(members, TWO_D, "test")
  np.testing.assert_allclose(F, [[0.4, 0.5], [0.7, 0.2]])
  ref = types.SimpleNamespace(objectives=TWO_D.objectives, hv_ref=[0.5, 1.0])
  assert nemo_jax.front_hypervolume(members, ref) == pytest.approx(0.3 * 0.5 + 0.1 * 0.3,
                                                                   abs=1e-6)
  assert nemo_jax.front_hypervolume([], TWO_D, "selection") == 0.0


def test_front_hypervolume_unmeasured_and_bad_set():
  members = [_member(0.2, 0.5, selection_top1=0.7), _member(0.4, 0.2)]
  assert nemo_jax.front_hypervolume(members, TWO_D, "selection") is None  # one lacks it
  no_accuracy = types.SimpleNamespace(objectives=("model_ratio",), hv_ref=None)
  assert nemo_jax.front_objectives([{"objectives": {"model_ratio": 0.5},
                                     "final_top1": 0.9}], no_accuracy, "test") is None
  with pytest.raises(ValueError, match="images='train'.*allowed.*selection"):
    nemo_jax.front_hypervolume(members, TWO_D, "train")


def test_dominates_point_by_hand():
  front = np.array([[0.2, 0.5], [0.4, 0.2]])
  assert compare.dominates_point(front, np.array([0.3, 0.5]))     # better error, equal ratio
  assert not compare.dominates_point(front, np.array([0.2, 0.5]))  # equal: not dominated
  assert not compare.dominates_point(front, np.array([0.1, 0.9]))
  assert not compare.dominates_point(None, np.array([0.3, 0.5]))


def test_tiny_comparison_and_merge(tmp_path):
  a, b, merged = (str(tmp_path / n) for n in ("a", "b", "merged"))
  table = compare.main(["--config", SMOKE, "--seeds", "1", "--generations", "1",
                        "--methods", "nemo", "uniform_sweep", "--out", a])
  rows = {r["method"]: r for r in table}
  assert set(rows) == {"nemo", "uniform_sweep"}
  cfg = nemo_jax.load_search_config(SMOKE)
  # Equal budgets of DISTINCT evaluations: population * (generations + 1), reached within
  # the last generation.
  per_seed = list(csv.DictReader(open(os.path.join(a, "per_seed.csv"))))
  nemo_row = next(r for r in per_seed if r["method"] == "nemo")
  assert cfg.population * 2 <= int(nemo_row["unique_evaluations"]) < cfg.population * 3
  assert rows["uniform_sweep"]["evaluations"] == len(cfg.bit_choices) ** 2
  for r in table:
    assert 0.0 < r["hv_selection_mean"] < 1.0 and 0.0 < r["hv_test_mean"] < 1.0
  for f in ("table.csv", "table.md", "hypervolume.png", "runs.json", "quality.md",
            "quality.csv", "per_seed.csv"):
    assert os.path.getsize(os.path.join(a, f)) > 0
  assert 0.0 <= float(nemo_row["bhv_test"]) <= 1.0
  assert "vs sweep (95% CI)" in open(os.path.join(a, "quality.md")).read()
  saved = json.load(open(os.path.join(a, "runs.json")))
  assert set(saved["reference_points"]) == {"W8A8", "W4A4", "W3A8"}
  sweep = next(r for r in saved["runs"] if r["method"] == "uniform_sweep")
  for m in sweep["front"]:  # every sweep member is a uniform (W, A) configuration
    assert len(set(m["w_bits"])) == 1 and len(set(m["a_bits"])) == 1
  # A front's out-of-sample hypervolume is the library's on its members.
  nemo_run = next(r for r in saved["runs"] if r["method"] == "nemo")
  assert nemo_run["hv"]["test"] == pytest.approx(
      nemo_jax.front_hypervolume(nemo_run["front"], cfg, "test"), abs=1e-6)

  # A second seed "run elsewhere" (the same runs renamed): the merge averages both.
  os.makedirs(b)
  other = dict(saved, runs=[dict(r, seed=1) for r in saved["runs"] if r["method"] == "nemo"])
  json.dump(other, open(os.path.join(b, "runs.json"), "w"))
  rows = {r["method"]: r for r in compare.main(["--merge", a, b, "--out", merged])}
  assert rows["nemo"]["seeds"] == 2 and rows["uniform_sweep"]["seeds"] == 1
  assert rows["nemo"]["hv_test_std"] == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(SystemExit, match="seed 0 is in two folders"):
    compare.main(["--merge", a, a, "--out", merged])
  shutil.rmtree(b)
  with pytest.raises(SystemExit, match="cannot read"):
    compare.main(["--merge", a, b, "--out", merged])


def test_bootstrap_interval_by_hand():
  mean, lo, hi = compare.bootstrap_ci([0.1, 0.1, 0.1])
  assert (mean, lo, hi) == pytest.approx((0.1, 0.1, 0.1))
  mean, lo, hi = compare.bootstrap_ci([0.0, 1.0] * 10)
  assert mean == pytest.approx(0.5) and 0.25 < lo < 0.5 < hi < 0.75
  assert compare.bootstrap_ci([float("nan"), 2.0]) == (2.0, 2.0, 2.0)


def test_quality_figures_read_the_report():
  q = {"bounded_hypervolume": {"selection": 0.3, "test": 0.4},
       "uniform_bounded_hypervolume": {"test": 0.35},
       "iso_accuracy": [
           {"drop": 0.01, "cost": "model_ratio", "gain": 1.2, "front": {"factor": 6.0}},
           {"drop": 0.01, "cost": "bops_ratio", "gain": None, "front": None}],
       "iso_cost": [{"test_top1": 0.9, "uniform_test_top1": 0.88},
                    {"test_top1": None, "uniform_test_top1": 0.2}]}
  f = compare.quality_figures(q)
  assert (f["bhv_test"], f["gain_model_1pt"], f["factor_model_1pt"]) == (0.4, 1.2, 6.0)
  assert np.isnan(f["gain_bops_1pt"]) and f["iso_cost_gain"] == pytest.approx(2.0)
