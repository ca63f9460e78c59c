"""The images of a problem: in-memory splits, and the disjoint sets drawn from ``eval_split``.

A search touches three disjoint sets of ``eval_split`` images (``docs/DESIGN.md``, "Image
sets"): the fitness images (scored every generation), the calibration images, and the
selection images (held out; reports pick members by them), plus a capped subset of the
test split (:func:`capped_split`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from nemo_jax._src import data as data_lib
from nemo_jax._src.faults import check_finite_images
from nemo_jax._src.problem.config import IN_MEMORY_DATASET, IN_MEMORY_SPLITS, ProblemConfig


def data_splits(data) -> dict:
  """In-memory data as ``{split: (images float32 [N, H, W, C], labels int32 [N])}``.

  Args:
    data: ``(images, labels)`` (the split ``"train"``: fitness subset and calibration)
      or ``{"train": (images, labels), "test": (images, labels)}`` (``"test"`` is where
      the final front is re-evaluated). Images are used as given (preprocessed).

  Raises:
    ValueError naming the split and the problem (also: an image holding NaN / inf,
    naming the first one).
  """
  if isinstance(data, (tuple, list)):
    data = {"train": data}
  if not isinstance(data, Mapping) or not data:
    raise ValueError(f"data: got {type(data).__name__}; allowed: (images, labels) or "
                     f"{{split: (images, labels)}} with splits in {IN_MEMORY_SPLITS}")
  out = {}
  for split, pair in data.items():
    if split not in IN_MEMORY_SPLITS:
      raise ValueError(f"data: split {split!r} is invalid; allowed: {IN_MEMORY_SPLITS}")
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
      raise ValueError(f"data[{split!r}]: got {type(pair).__name__}; allowed: a pair "
                       "(images, labels)")
    images, labels = np.asarray(pair[0]), np.asarray(pair[1])
    if images.ndim != 4 or len(images) < 1:
      raise ValueError(f"data[{split!r}]: images of shape {images.shape}; allowed: "
                       "[N, H, W, C] with N >= 1")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) \
        or labels.min() < 0:
      raise ValueError(f"data[{split!r}]: labels of shape {labels.shape} / dtype "
                       f"{labels.dtype}; allowed: non-negative integers [{len(images)}]")
    if not (np.issubdtype(images.dtype, np.number) or images.dtype == np.bool_):
      raise ValueError(f"data[{split!r}]: images of dtype {images.dtype}; allowed: numbers")
    # Non-finite images would give NaN accuracies and an empty front: an error here.
    check_finite_images(images, f"data[{split!r}]")
    out[split] = (images.astype(np.float32), labels.astype(np.int32))
  shapes = {s: x.shape[1:] for s, (x, _) in out.items()}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"data: image shapes differ between splits {shapes}; allowed: one shape")
  return out


def split_arrays(cfg: ProblemConfig, split: str, data: Mapping | None = None):
  """``(images preprocessed, labels)`` of a split: from files, or ``data`` (``"arrays"``)."""
  if cfg.dataset != IN_MEMORY_DATASET:
    images, labels = data_lib.load_split(cfg.dataset, split, source_dir=cfg.data_dir)
    return data_lib.preprocess(cfg.dataset, images), labels
  if data is None:
    raise ValueError("dataset='arrays': pass data= to nemo_jax.search / build_problem "
                     "(the in-memory splits are not stored with the run)")
  if split not in data:
    raise ValueError(f"split {split!r} is not in data (splits {sorted(data)}); allowed: "
                     f"one of {sorted(data)} (eval_split / final_split)")
  return data[split]


IMAGE_SETS = ("fitness", "calibration", "selection")
"""The image sets a search draws from ``eval_split``, in drawing order (disjoint)."""
IMAGE_SET_FIELDS = ("eval_per_class", "calib_per_class", "selection_per_class")
"""The config field giving each set's images per class."""


def image_sets(cfg: ProblemConfig, labels, seed: int, selection_per_class: int,
               held_out: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """Indices of the fitness, calibration and selection images among ``eval_split``'s.

  Pure: ``data.disjoint_stratified_subsets`` of the labels, with the sizes of
  ``IMAGE_SET_FIELDS`` and the seed (fitness ``seed``, calibration ``seed + 1``,
  selection ``seed + 2``, each from the images the sets before it left), so no image is
  in two sets and the fitness and calibration images do not depend on
  ``selection_per_class`` (``docs/DESIGN.md``, "Image sets"). With ``held_out`` (the
  images the checkpoint was NOT trained on, ``data.held_out_split``), fitness and
  calibration come from the training images and the selection images only from the
  held-out ones.

  Args:
    cfg: the problem section (``eval_per_class``, ``calib_per_class``, ``eval_split``).
    labels: the labels of ``eval_split`` ``[N]``.
    seed: the run's image seed.
    selection_per_class: the run section's selection images per class.
    held_out: ``(per_class, seed)`` of the checkpoint's held-out images, or None.

  Returns:
    ``{name: sorted int64 indices}`` for every name of ``IMAGE_SETS``.

  Raises:
    ValueError naming the field and the numbers: a class of ``eval_split`` with fewer
    images than the sets ask for, or more selection images than are held out.
  """
  sizes = [cfg.eval_per_class, cfg.calib_per_class, selection_per_class]
  if held_out is None:
    try:
      idx = data_lib.disjoint_stratified_subsets(labels, sizes, seed, names=IMAGE_SET_FIELDS)
    except ValueError as e:
      raise ValueError(f"{e} (images of eval_split={cfg.eval_split!r})") from None
    return dict(zip(IMAGE_SETS, idx))
  per_class, held_seed = held_out
  if selection_per_class > per_class:
    raise ValueError(f"selection_per_class={selection_per_class} exceeds the {per_class} "
                     "images per class the checkpoint was not trained on; allowed: at most "
                     f"{per_class} (or a checkpoint trained with more held out)")
  labels = np.asarray(labels)
  train, held = data_lib.held_out_split(labels, per_class, held_seed)
  try:
    fit, cal = data_lib.disjoint_stratified_subsets(labels[train], sizes[:2], seed,
                                                    names=IMAGE_SET_FIELDS[:2])
  except ValueError as e:
    raise ValueError(f"{e} (training images of eval_split={cfg.eval_split!r})") from None
  sel = (data_lib.stratified_subset(labels[held], selection_per_class, seed + 2)
         if selection_per_class else np.zeros(0, np.int64))
  return {"fitness": np.sort(train[fit]), "calibration": np.sort(train[cal]),
          "selection": np.sort(held[sel])}


def eval_split_sets(cfg: ProblemConfig, seed: int, selection_per_class: int,
                    data: Mapping | None = None, names: Sequence[str] = IMAGE_SETS,
                    held_out: tuple[int, int] | None = None) -> dict:
  """``{name: (images preprocessed, labels)}`` of the image sets ``names`` (``image_sets``).

  Every set's size is checked (a class too small is an error even if its set is not
  asked for); only the sets named are preprocessed.
  """
  if cfg.dataset != IN_MEMORY_DATASET:
    images, labels = data_lib.load_split(cfg.dataset, cfg.eval_split, source_dir=cfg.data_dir)
    pre = lambda x: data_lib.preprocess(cfg.dataset, x)
  else:
    (images, labels), pre = split_arrays(cfg, cfg.eval_split, data), lambda x: x
  idx = image_sets(cfg, labels, seed, selection_per_class, held_out)
  return {n: (pre(images[idx[n]]), labels[idx[n]]) for n in names}


def fitness_data(cfg: ProblemConfig, seed: int, selection_per_class: int,
                 data: Mapping | None = None, held_out: tuple[int, int] | None = None):
  """``(x_fitness, y_fitness, x_calibration)``: disjoint stratified subsets of ``eval_split``.

  ``selection_per_class`` does not change them (the selection set is drawn last); it is
  passed so that a class too small for all three sets is an error here, before any work.
  """
  sets = eval_split_sets(cfg, seed, selection_per_class, data, ("fitness", "calibration"),
                         held_out)
  return (*sets["fitness"], sets["calibration"][0])


def selection_data(cfg: ProblemConfig, seed: int, selection_per_class: int,
                   data: Mapping | None = None, held_out: tuple[int, int] | None = None):
  """``(images, labels)`` of the selection set, or None with ``selection_per_class=0``."""
  if selection_per_class == 0:
    return None
  return eval_split_sets(cfg, seed, selection_per_class, data, ("selection",),
                         held_out)["selection"]


def capped_split(cfg: ProblemConfig, split: str, max_images: int, seed: int,
                 data: Mapping | None = None):
  """``(images, labels)`` of a stratified subset of at most ``max_images`` of ``split``
  (``data.capped_stratified_subset``; lazy ``ImageFiles`` stay lazy, decoded when read)."""
  images, labels = split_arrays(cfg, split, data)
  idx = data_lib.capped_stratified_subset(labels, max_images, seed, cfg.resolved_num_classes)
  if isinstance(images, data_lib.ImageFiles):
    return images.subset(idx), labels[idx]
  return images[idx], labels[idx]
