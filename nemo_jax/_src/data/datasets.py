"""Public data API: load splits from local files, preprocess, subset, batch, augment.

Nothing is downloaded. `fashion_mnist_embedded` is a stratified Fashion-MNIST
subset shipped inside the package (`nemo_jax/assets/fashion_mnist_subset.npz`,
MIT licence, see `FASHION_MNIST_LICENSE.txt`); the other datasets are built by
TensorFlow-free tfds builders (`builders.py`) from directories the user gives,
cached as array_record files and read back with `tfds.data_source`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from nemo_jax._src.data import builders
from nemo_jax._src.data import files

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "assets")
EMBEDDED_FILE = os.path.join(ASSETS_DIR, "fashion_mnist_subset.npz")
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "nemo_jax", "tfds")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a dataset.

  Attributes:
    input_shape: (H, W, C) of one preprocessed image.
    num_classes: number of classes (labels are 0..num_classes-1).
    splits: split names `load_split` accepts.
    mean: per-channel mean of the [0, 1]-scaled images, used by `preprocess`.
    std: per-channel std of the [0, 1]-scaled images, used by `preprocess`.
    crop_padding: zero padding of the random crop in `augment` (0: not supported).
    horizontal_flip: whether `augment` flips images left-right.
  """

  input_shape: tuple[int, int, int]
  num_classes: int
  splits: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_padding: int
  horizontal_flip: bool


# Fashion-MNIST statistics are those of its 60k training images (0.2860, 0.3530);
# MNIST's are the customary (0.1307, 0.3081). CIFAR-10 uses the per-channel
# mean/std of its 50k training images; ImageNet torchvision's normalisation.
_FASHION_SPEC = DatasetSpec((28, 28, 1), 10, ("train", "test"), (0.2860,), (0.3530,), 2, True)
DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist_embedded": _FASHION_SPEC,
    "fashion_mnist": _FASHION_SPEC,
    "mnist": DatasetSpec((28, 28, 1), 10, ("train", "test"), (0.1307,), (0.3081,), 2, False),
    "cifar10": DatasetSpec((32, 32, 3), 10, ("train", "test"), (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), 4, True),
    "imagenet2012": DatasetSpec((224, 224, 3), 1000, ("train", "validation"),
                                (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0, False),
}

_SPLIT_PATTERN = re.compile(r"^(?P<base>[A-Za-z_]+)(?P<slice>\[.*\])?$")


def _spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise ValueError(f"name={name!r} is not a known dataset, allowed: {sorted(DATASETS)}")
  return DATASETS[name]


def _parse_split(name: str, split: str) -> tuple[str, str]:
  """Returns (base split, split with tfds slice), mapping imagenet's "val" to "validation"."""
  match = _SPLIT_PATTERN.match(split) if isinstance(split, str) else None
  base = match.group("base") if match else None
  if name == "imagenet2012" and base == "val":
    base = "validation"
  allowed = _spec(name).splits
  if base not in allowed:
    raise ValueError(f"split={split!r} for dataset {name!r}, allowed: {list(allowed)} "
                     "(optionally with a tfds slice such as 'train[:1000]')")
  return base, base + (match.group("slice") or "")


def load_embedded(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads a split of the shipped Fashion-MNIST subset.

  Args:
    split: "train" (1,000 images per class) or "test" (200 per class).

  Returns:
    (images uint8 [N, 28, 28, 1], labels int32 [N]).
  """
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r} for dataset 'fashion_mnist_embedded', allowed: "
                     "['train', 'test']")
  if not os.path.isfile(EMBEDDED_FILE):
    raise ValueError(f"embedded data file {EMBEDDED_FILE} is missing; regenerate it with "
                     "scripts/make_embedded_data.py")
  with np.load(EMBEDDED_FILE) as data:
    return data[f"x_{split}"].astype(np.uint8), data[f"y_{split}"].astype(np.int32)


def _read_all(source, spec: DatasetSpec, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Materialises a tfds random-access data source into numpy arrays."""
  count = len(source)
  images = np.empty((count,) + spec.input_shape, dtype=np.uint8)
  labels = np.empty((count,), dtype=np.int32)
  for start in range(0, count, chunk):
    records = source.__getitems__(list(range(start, min(count, start + chunk))))
    for offset, record in enumerate(records):
      images[start + offset] = record["image"]
      labels[start + offset] = record["label"]
  return images, labels


def open_split(name: str, split: str, data_dir: Optional[str] = None,
               source_dir: Optional[str] = None):
  """Builds (once) and opens a split as a random-access tfds data source.

  Use this instead of `load_split` for splits that do not fit in memory
  (ImageNet train: 150 KB per image).

  Args:
    name: "fashion_mnist", "mnist", "cifar10" or "imagenet2012".
    split: see `load_split`.
    data_dir: cache root (default `$NEMO_JAX_DATA_DIR` or ~/.cache/nemo_jax/tfds).
    source_dir: directory with the raw files (see `load_split`).

  Returns:
    A sequence of dicts {"image": uint8 HWC, "label": int}.
  """
  _spec(name)
  if name == "fashion_mnist_embedded":
    raise ValueError("name='fashion_mnist_embedded' is an in-memory file; use load_split")
  _, full_split = _parse_split(name, split)
  if source_dir is None and name == "fashion_mnist" and os.path.isdir(DEBIAN_FASHION_MNIST_DIR):
    source_dir = DEBIAN_FASHION_MNIST_DIR
  if data_dir is None:
    data_dir = os.environ.get("NEMO_JAX_DATA_DIR", DEFAULT_DATA_DIR)
  return builders.prepare_and_open(name, full_split, source_dir, os.path.expanduser(data_dir))


def load_split(name: str, split: str, data_dir: Optional[str] = None,
               source_dir: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split of a dataset from local files into memory.

  Args:
    name: one of `DATASETS`: "fashion_mnist_embedded" (shipped subset, splits
      train/test), "fashion_mnist" and "mnist" (IDX files
      `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`), "cifar10" (python
      pickle batches `[cifar-10-batches-py/]{data_batch_1..5,test_batch}`),
      "imagenet2012" (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`; splits
      "train" and "validation" (alias "val"); images come resized to 256 and
      center-cropped to 224 as torchvision's evaluation transform does).
    split: a split name, optionally with a tfds slice ("test[:500]") for the
      tfds-built datasets.
    data_dir: root of the tfds cache; the build for a source directory lives in
      `<data_dir>/<hash of source_dir>/` (default `$NEMO_JAX_DATA_DIR` or
      ~/.cache/nemo_jax/tfds).
    source_dir: directory holding the raw files; for "fashion_mnist" it
      defaults to Debian's /usr/share/datasets/fashion-mnist when present.

  Returns:
    (images uint8 [N, H, W, C], labels int32 [N]), in source-file order. For
    "imagenet2012" (no slice) images are a lazy
    :class:`~nemo_jax._src.data.files.ImageFiles` (:func:`open_image_files`):
    indexing decodes only the selected files, ``np.asarray`` decodes all.

  Raises:
    ValueError: unknown name or split (listing allowed values), or a missing /
      malformed source file (naming the expected layout and the first missing file).
  """
  spec = _spec(name)
  if name == "fashion_mnist_embedded":
    return load_embedded(split)
  base, full_split = _parse_split(name, split)
  if name == "imagenet2012" and base == full_split:
    return open_image_files(split, data_dir=data_dir, source_dir=source_dir)
  source = open_split(name, split, data_dir=data_dir, source_dir=source_dir)
  return _read_all(source, spec)


def open_image_files(split: str, data_dir: Optional[str] = None,
                     source_dir: Optional[str] = None):
  """An ImageNet-layout split as a lazy file list: ``(ImageFiles, labels int32 [N])``.

  Lists ``<source_dir>/{train,val}/<wnid>/*`` (no image is opened); indexing the
  returned :class:`~nemo_jax._src.data.files.ImageFiles` decodes only the chosen files
  (threads; stacks up to ``files.CACHE_MAX_IMAGES`` cached under
  ``<data_dir>/<hash of source_dir>/decoded/``). A search therefore decodes its
  stratified subsets only, and the final split is streamed block by block.

  Raises:
    ValueError: a missing split directory or an empty class directory (naming it).
  """
  base, _ = _parse_split("imagenet2012", split)
  paths, labels = files.imagenet_split_files(source_dir, base)
  if data_dir is None:
    data_dir = os.environ.get("NEMO_JAX_DATA_DIR", DEFAULT_DATA_DIR)
  cache = os.path.join(files.cache_dir_for(data_dir, source_dir), "decoded")
  return files.ImageFiles(paths, cache_dir=cache), labels


def preprocess(name: str, images: np.ndarray) -> np.ndarray:
  """Scales uint8 images to [0, 1] and normalises them with the dataset's mean/std.

  MNIST / Fashion-MNIST: (x / 255 - mean) / std with their training-set
  statistics; CIFAR-10: per-channel training-set mean/std; ImageNet:
  torchvision's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) on
  images already resized/cropped to 224 by the loader (`imagenet_eval_crop`).

  Args:
    name: one of `DATASETS`.
    images: uint8 [N, H, W, C] with (H, W, C) = `DATASETS[name].input_shape`.

  Returns:
    float32 [N, H, W, C].
  """
  spec = _spec(name)
  if isinstance(images, files.ImageFiles):  # lazy: each decoded stack is preprocessed
    return images.map(lambda x: preprocess(name, x))
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"images dtype={images.dtype}, allowed: uint8")
  if images.ndim != 4 or tuple(images.shape[1:]) != spec.input_shape:
    raise ValueError(f"images shape={images.shape} for dataset {name!r}, allowed: "
                     f"[N, {', '.join(map(str, spec.input_shape))}]")
  mean = np.asarray(spec.mean, dtype=np.float32)
  std = np.asarray(spec.std, dtype=np.float32)
  return ((images.astype(np.float32) / np.float32(255.0) - mean) / std).astype(np.float32)


def stratified_subset(labels: np.ndarray, per_class: int, seed: int,
                      num_classes: Optional[int] = None) -> np.ndarray:
  """Picks `per_class` random examples of every class, deterministically.

  Args:
    labels: int labels [N].
    per_class: number of examples per class (k).
    seed: numpy seed; the same (labels, k, seed) always gives the same indices.
    num_classes: if given, classes 0..num_classes-1 must all be present;
      otherwise the classes are those occurring in `labels`.

  Returns:
    int64 indices into `labels`, sorted ascending, `per_class` per class.

  Raises:
    ValueError: a class has fewer than `per_class` examples.
  """
  labels, classes = _labels_and_classes(labels, num_classes)
  _check_per_class("per_class", per_class)
  available = np.ones(labels.shape, bool)

  def fail(cls, count):
    raise ValueError(f"class {cls} has {count} examples, fewer than per_class={per_class}")

  return _draw(labels, available, classes, per_class, np.random.default_rng(seed), fail)


def capped_stratified_subset(labels: np.ndarray, max_images: int, seed: int,
                             num_classes: Optional[int] = None) -> np.ndarray:
  """A stratified subset of at most ``max_images`` examples (at least one per class).

  ``per_class = max(1, min(max_images // classes, smallest class))`` examples of every
  class (``stratified_subset``); ``classes`` is ``num_classes`` or the number of label
  values (``max(labels) + 1``).

  Returns:
    int64 indices into ``labels``, sorted ascending.
  """
  labels = np.asarray(labels)
  counts = np.bincount(labels)
  classes = len(counts) if num_classes is None else int(num_classes)
  per_class = max(1, min(int(max_images) // classes, int(counts.min())))
  return stratified_subset(labels, per_class, seed=seed)


def held_out_split(labels: np.ndarray, per_class: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """``(training indices, held-out indices)`` of a split: ``per_class`` examples of every
  class held out (``stratified_subset`` with ``seed``), the rest for training.

  A model trained on the training indices has never seen the held-out ones: searches
  draw their selection images from them (``docs/DESIGN.md``, "Image sets").
  """
  labels = np.asarray(labels)
  held = stratified_subset(labels, per_class, seed) if per_class else np.zeros(0, np.int64)
  train = np.setdiff1d(np.arange(len(labels)), held)
  return train, held


def disjoint_stratified_subsets(labels: np.ndarray, per_class: Sequence[int], seed: int,
                                names: Optional[Sequence[str]] = None,
                                num_classes: Optional[int] = None) -> list[np.ndarray]:
  """Disjoint stratified subsets, drawn one after the other from what is left.

  Subset ``k`` holds ``per_class[k]`` examples of every class, drawn with the numpy seed
  ``seed + k`` from the examples no earlier subset took; subset 0 is exactly
  ``stratified_subset(labels, per_class[0], seed)``. So a subset never depends on the
  sizes of the subsets drawn after it (the search's fitness and calibration images do
  not change with the size of the selection set; ``docs/DESIGN.md``, "Image sets").

  Args:
    labels: int labels [N].
    per_class: examples per class of each subset (0: an empty subset).
    seed: base numpy seed; the same arguments always give the same indices.
    names: the field each size comes from (error messages; default ``subset[k]``).
    num_classes: if given, the classes are 0..num_classes-1; otherwise those occurring
      in `labels`.

  Returns:
    One int64 index array into `labels` per subset, each sorted ascending, with
    ``per_class[k]`` indices per class; no index is in two subsets.

  Raises:
    ValueError naming the field and the numbers: a size that is not an integer >= 0, or
    a class with fewer examples left than a subset asks for.
  """
  labels, classes = _labels_and_classes(labels, num_classes)
  per_class = list(per_class)
  names = [f"subset[{k}]" for k in range(len(per_class))] if names is None else list(names)
  if len(names) != len(per_class):
    raise ValueError(f"names: {len(names)} names for {len(per_class)} sizes; allowed: one "
                     "name per size")
  for name, k in zip(names, per_class):
    _check_per_class(name, k)
  available = np.ones(labels.shape, bool)
  out = []
  for k, (name, size) in enumerate(zip(names, per_class)):

    def fail(cls, count, k=k, name=name, size=size):
      before = ", ".join(f"{n}={c}" for n, c in zip(names[:k], per_class[:k]))
      taken = f" left after {before}" if k else ""
      total = int(np.sum(labels == cls))
      raise ValueError(f"{name}={size}: class {cls} has {count} examples{taken} "
                       f"({total} in all); allowed: {name} <= {count}")

    chosen = _draw(labels, available, classes, size, np.random.default_rng(seed + k), fail)
    available[chosen] = False
    out.append(chosen)
  return out


def _labels_and_classes(labels, num_classes):
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels shape={labels.shape}, allowed: [N]")
  classes = np.unique(labels) if num_classes is None else np.arange(num_classes)
  return labels, classes


def _check_per_class(name: str, per_class) -> None:
  if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) \
      or per_class < 0:
    raise ValueError(f"{name}={per_class!r}, allowed: an integer >= 0")


def _draw(labels, available, classes, per_class, rng, fail) -> np.ndarray:
  """``per_class`` random available examples of every class (sorted int64 indices)."""
  chosen = []
  for cls in classes:
    members = np.flatnonzero((labels == cls) & available)
    if members.size < per_class:
      fail(cls, members.size)
    chosen.append(rng.choice(members, size=per_class, replace=False))
  if not chosen:
    return np.zeros((0,), dtype=np.int64)
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def numpy_rng(key_or_seed: Any) -> np.random.Generator:
  """A numpy Generator from an int seed, a numpy Generator or a JAX PRNG key."""
  if isinstance(key_or_seed, np.random.Generator):
    return key_or_seed
  if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
    return np.random.default_rng(int(key_or_seed))
  import jax  # Imported lazily: only needed when given a JAX key.

  key = key_or_seed
  if hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  words = np.asarray(key)
  if words.dtype != np.uint32 or words.size == 0:
    raise ValueError(f"key_or_seed={key_or_seed!r}, allowed: an int seed, a numpy Generator or "
                     "a JAX PRNG key")
  return np.random.default_rng([int(w) for w in words.ravel()])


def iterate_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, key_or_seed: Any,
                    shuffle: bool = True, drop_last: bool = True
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (images, labels) mini-batches for one epoch.

  Args:
    images: [N, ...] array.
    labels: [N] array.
    batch_size: examples per batch.
    key_or_seed: int seed, numpy Generator or JAX key for the shuffle.
    shuffle: permute the examples (otherwise source order).
    drop_last: drop the final short batch, so every batch has the same shape
      (one compile per shape).

  Yields:
    (images[batch], labels[batch]).
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"images has {images.shape[0]} examples, labels {labels.shape[0]}: "
                     "they must match")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}, allowed: an integer >= 1")
  count = images.shape[0]
  order = numpy_rng(key_or_seed).permutation(count) if shuffle else np.arange(count)
  stop = count - count % batch_size if drop_last else count
  for start in range(0, stop, batch_size):
    batch = order[start:start + batch_size]
    yield images[batch], labels[batch]


def augment(name: str, images: np.ndarray, key_or_seed: Any) -> np.ndarray:
  """Light training augmentation: zero-padded random crop and horizontal flip.

  Padding 2 for 28x28 datasets, 4 for CIFAR-10; flips left-right with
  probability 1/2 for fashion_mnist(_embedded) and cifar10, never for mnist
  (digits are not mirror-symmetric). Works on uint8 or float images.

  Args:
    name: a 28x28 or 32x32 dataset of `DATASETS`.
    images: [N, H, W, C].
    key_or_seed: int seed, numpy Generator or JAX key.

  Returns:
    Array of the same shape and dtype.
  """
  spec = _spec(name)
  if spec.crop_padding == 0:
    allowed = sorted(n for n, s in DATASETS.items() if s.crop_padding)
    raise ValueError(f"name={name!r} has no augmentation, allowed: {allowed}")
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images shape={images.shape}, allowed: [N, H, W, C]")
  rng = numpy_rng(key_or_seed)
  count, height, width, _ = images.shape
  pad = spec.crop_padding
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  top = rng.integers(0, 2 * pad + 1, size=count)
  left = rng.integers(0, 2 * pad + 1, size=count)
  rows = top[:, None] + np.arange(height)[None, :]
  cols = left[:, None] + np.arange(width)[None, :]
  if spec.horizontal_flip:
    flip = rng.random(count) < 0.5
    # Reading the crop's columns backwards is the same as flipping the crop.
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
  batch = np.arange(count)[:, None, None]
  return padded[batch, rows[:, :, None], cols[:, None, :]]
