"""The three image sets (fitness, selection, test) and the calibration images: the pure
split (``data.disjoint_stratified_subsets``) against hand-checked properties, and a smoke
search whose evaluated and calibrated images are mapped back to the split's indices."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_jax._src import calibration as calib_lib
from nemo_jax._src import data as data_lib
from nemo_jax._src import problem as problem_lib
from nemo_jax._src.data import disjoint_stratified_subsets, stratified_subset
from nemo_jax._src.problem import core as problem_core
from nemo_jax._src.run import search as run_lib
from nemo_jax._src.run.config import load_search_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "configs", "smoke.py")
NAMES = ("eval_per_class", "calib_per_class", "selection_per_class")


def _first_shortfall(counts, sizes):
  """(subset k, class, examples left) of the first class too small, by hand; or None."""
  taken = 0
  for k, size in enumerate(sizes):
    for c, n in enumerate(counts):
      if n > 0 and n - taken < size:
        return k, c, n - taken
    taken += size
  return None


@settings(deadline=None, max_examples=60)
@given(counts=st.lists(st.integers(0, 10), min_size=1, max_size=5),
       sizes=st.lists(st.integers(0, 4), min_size=1, max_size=3), seed=st.integers(0, 1000))
def test_disjoint_subsets_are_disjoint_stratified_and_prefix_stable(counts, sizes, seed):
  labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
  names = NAMES[:len(sizes)]
  short = _first_shortfall(counts, sizes)
  if short is not None:
    k, c, left = short
    with pytest.raises(ValueError) as e:
      disjoint_stratified_subsets(labels, sizes, seed, names=names)
    msg = str(e.value)
    assert msg.startswith(f"{names[k]}={sizes[k]}: class {c} has {left} examples")
    assert f"({counts[c]} in all); allowed: {names[k]} <= {left}" in msg
    if k:
      assert f"left after {names[0]}={sizes[0]}" in msg
    return
  subsets = disjoint_stratified_subsets(labels, sizes, seed, names=names)
  assert len(subsets) == len(sizes)
  present = [c for c, n in enumerate(counts) if n > 0]
  for idx, size in zip(subsets, sizes):
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)   # sorted, unique
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=len(counts)),
                                  [size if c in present else 0 for c in range(len(counts))])
  union = np.concatenate(subsets)
  assert len(np.unique(union)) == len(union)                      # pairwise disjoint
  # Subset 0 is the plain stratified subset; a subset never depends on later sizes.
  np.testing.assert_array_equal(subsets[0], stratified_subset(labels, sizes[0], seed))
  for j in range(1, len(sizes)):
    for a, b in zip(disjoint_stratified_subsets(labels, sizes[:j], seed), subsets):
      np.testing.assert_array_equal(a, b)
  again = disjoint_stratified_subsets(labels, sizes, seed, names=names)
  assert all(np.array_equal(a, b) for a, b in zip(again, subsets))


def test_disjoint_subsets_bad_sizes_name_the_field():
  labels = np.repeat(np.arange(3), 5)
  with pytest.raises(ValueError, match="selection_per_class=-1, allowed: an integer >= 0"):
    disjoint_stratified_subsets(labels, [1, 1, -1], 0, names=NAMES)
  with pytest.raises(ValueError, match="names: 2 names for 3 sizes"):
    disjoint_stratified_subsets(labels, [1, 1, 1], 0, names=NAMES[:2])


def _image_sets(cfg, labels):
  return problem_lib.image_sets(cfg.problem, labels, cfg.seed, cfg.selection_per_class)


def test_config_sets_and_their_errors():
  cfg = load_search_config(SMOKE)
  _, labels = data_lib.load_split(cfg.dataset, cfg.eval_split)
  sets = _image_sets(cfg, labels)
  assert {k: len(v) for k, v in sets.items()} == {"fitness": 20, "calibration": 20,
                                                  "selection": 40}
  # The search's fitness images are today's stratified subset (seed), and the
  # fitness / calibration images do not depend on the selection set's size.
  np.testing.assert_array_equal(sets["fitness"], stratified_subset(labels, 2, cfg.seed))
  none = _image_sets(load_search_config(SMOKE, selection_per_class=0), labels)
  for k in ("fitness", "calibration"):
    np.testing.assert_array_equal(none[k], sets[k])
  assert len(none["selection"]) == 0
  cfg0 = load_search_config(SMOKE, selection_per_class=0)
  assert problem_lib.selection_data(cfg0.problem, cfg0.seed, cfg0.selection_per_class) is None
  with pytest.raises(ValueError, match=r"selection_per_class=997: class 0 has 996 examples "
                     r"left after eval_per_class=2, calib_per_class=2 \(1000 in all\); "
                     r"allowed: selection_per_class <= 996 \(images of eval_split='train'\)"):
    _image_sets(load_search_config(SMOKE, selection_per_class=997), labels)
  with pytest.raises(ValueError, match="selection_per_class"):
    load_search_config(SMOKE, selection_per_class=-1)


def test_smoke_search_images_fitness_selection_calibration_are_disjoint(monkeypatch):
  evaluated, calibrated = [], []

  class Recording(problem_core.Evaluator):
    def __init__(self, model, variables, scheme, images, labels, **kw):
      evaluated.append(np.asarray(images))
      super().__init__(model, variables, scheme, images, labels, **kw)

    def run_images(self, configs, images, labels, preprocess=None, **kw):
      # The final phase streams the selection and test images through this evaluator.
      evaluated.append(np.asarray(images if preprocess is None else preprocess(images)))
      return super().run_images(configs, images, labels, preprocess=preprocess, **kw)

  original = calib_lib.load_or_calibrate

  def recording_calibrate(path, model, variables, images, **kw):
    calibrated.append(np.asarray(images))
    return original(path, model, variables, images, **kw)

  monkeypatch.setattr(problem_core, "Evaluator", Recording)
  monkeypatch.setattr(calib_lib, "load_or_calibrate", recording_calibrate)
  result = run_lib.search(SMOKE, out_dir=None, generations=0, progress=False)
  cfg = result.config

  # Map every image the search used back to its index in the preprocessed split.
  images, labels = data_lib.load_split(cfg.dataset, cfg.eval_split)
  row = {r.tobytes(): i for i, r in enumerate(data_lib.preprocess(cfg.dataset, images))}

  def indices(x):
    return np.asarray([row[r.tobytes()] for r in x])

  assert len(evaluated) == 3 and len(calibrated) == 1   # fitness, selection, test
  fitness, selection = indices(evaluated[0]), indices(evaluated[1])
  calibration = indices(calibrated[0])
  assert (len(fitness), len(calibration), len(selection)) == (20, 20, 40)
  for idx, per_class in ((fitness, 2), (calibration, 2), (selection, 4)):
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=10), [per_class] * 10)
  assert not set(fitness) & set(selection)
  assert not set(fitness) & set(calibration)
  assert not set(selection) & set(calibration)
  # The test images come from final_split, not the training split.
  assert evaluated[2].shape[0] == 40 and not {r.tobytes() for r in evaluated[2]} & set(row)
  for m in result.front + result.uniform:
    assert 0.0 <= m["selection_top1"] <= 1.0 and 0.0 <= m["final_top1"] <= 1.0


def test_a_resume_may_change_the_selection_set_only(tmp_path):
  # The selection set is drawn last and only used after the loop: a resumed run may
  # change its size (fitness and calibration, hence the saved state, stay the same).
  from nemo_jax._src.faults import write_json
  from nemo_jax._src.run.rundir import CONFIG_FILE
  cfg = load_search_config(SMOKE)
  write_json(str(tmp_path / CONFIG_FILE), {"config": cfg.to_dict()})
  resumed = run_lib._resumed_config(str(tmp_path), None, None, {"selection_per_class": 1})
  assert resumed.selection_per_class == 1 and resumed.eval_per_class == cfg.eval_per_class
  with pytest.raises(ValueError, match="calib_per_class"):
    run_lib._resumed_config(str(tmp_path), None, None, {"calib_per_class": 3})
