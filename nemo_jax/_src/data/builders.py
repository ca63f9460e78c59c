"""TensorFlow-free tfds builders that read datasets from local files.

Every builder is a `tfds.core.GeneratorBasedBuilder` writing `array_record`
files, read back with `tfds.data_source` (random access). Only pieces of tfds
that do not import TensorFlow are used: `tfds.features.Tensor` for images
(given as numpy uint8 arrays; `tfds.features.Image` would need TF to encode)
and `tfds.features.ClassLabel` for labels. Nothing is downloaded: the source
directory is handed to tfds as the manual directory
(`DownloadConfig(manual_dir=...)`).

Builders (tfds names) and the source layout each expects:

- `nemo_mnist`, `nemo_fashion_mnist`:
  `<source_dir>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.
- `nemo_cifar10`: the python pickle batches,
  `<source_dir>/[cifar-10-batches-py/]{data_batch_1..5,test_batch}`.
- `nemo_imagenet2012/train`, `nemo_imagenet2012/validation` (one builder
  config per split, so that building the validation set does not decode the
  1.28M training images): `<source_dir>/train/<wnid>/*.JPEG` and
  `<source_dir>/val/<wnid>/*.JPEG`. Class index = position of the wnid in the
  sorted list of `train/` sub-directories (of `val/` when there is no `train/`).
  Images are stored already decoded with the torchvision evaluation transform
  (RGB, resize the shorter side to 256 with PIL bilinear, center crop 224) as
  uint8 [224, 224, 3]: reading is then free of JPEG decoding, at the price of
  150 KB per image on disk (7.5 GB for the 50k validation images).

The names carry a `nemo_` prefix because tfds already registers builders named
`mnist`, `cifar10`, ... (which need TensorFlow).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import pickle
from typing import Iterator, Optional, Sequence

import numpy as np

from nemo_jax._src.data import idx
from nemo_jax._src.data.files import (IMAGENET_CROP, IMAGENET_LAYOUT, IMAGENET_RESIZE,
                                      _IMAGENET_DIRS, _require_dir, cache_dir_for,
                                      imagenet_class_names,
                                      imagenet_eval_crop, imagenet_split_files)

# ------------------------------------------------------------------ layouts

MNIST_LAYOUT = "<source_dir>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"
CIFAR10_LAYOUT = "<source_dir>/[cifar-10-batches-py/]{data_batch_1..data_batch_5,test_batch}"

_IDX_PREFIX = {"train": "train", "test": "t10k"}
_CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                       "ship", "truck")


def idx_split_files(name: str, source_dir: Optional[str], split: str) -> tuple[str, str]:
  """Finds the IDX image and label files of one MNIST-style split.

  Args:
    name: dataset name, for messages.
    source_dir: directory with the IDX files (gzip-compressed or not).
    split: "train" or "test".

  Returns:
    (images path, labels path).

  Raises:
    ValueError: naming the expected layout and the first missing file.
  """
  source_dir = _require_dir(name, source_dir, MNIST_LAYOUT)
  if split not in _IDX_PREFIX:
    raise ValueError(f"split={split!r} for dataset {name!r}, allowed: {sorted(_IDX_PREFIX)}")
  found = []
  for kind in ("images-idx3", "labels-idx1"):
    stem = f"{_IDX_PREFIX[split]}-{kind}-ubyte"
    candidates = [os.path.join(source_dir, stem + ext) for ext in (".gz", "")]
    existing = [path for path in candidates if os.path.isfile(path)]
    if not existing:
      raise ValueError(f"dataset {name!r}: missing file {candidates[1]}[.gz] in "
                       f"source_dir={source_dir!r}; expected layout {MNIST_LAYOUT}")
    found.append(existing[0])
  return found[0], found[1]


def cifar10_batch_dir(source_dir: Optional[str]) -> str:
  """Returns the directory holding the CIFAR-10 pickle batches.

  Accepts either `cifar-10-batches-py` itself or its parent.

  Raises:
    ValueError: naming the expected layout and the first missing file.
  """
  source_dir = _require_dir("cifar10", source_dir, CIFAR10_LAYOUT)
  nested = os.path.join(source_dir, "cifar-10-batches-py")
  batch_dir = nested if os.path.isdir(nested) else source_dir
  for split in ("train", "test"):
    for file_name in _CIFAR10_FILES[split]:
      path = os.path.join(batch_dir, file_name)
      if not os.path.isfile(path):
        raise ValueError(f"dataset 'cifar10': missing file {path} in source_dir={source_dir!r}; "
                         f"expected layout {CIFAR10_LAYOUT}")
  return batch_dir


def read_cifar10_split(source_dir: Optional[str], split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads CIFAR-10 pickle batches.

  Args:
    source_dir: see `cifar10_batch_dir`.
    split: "train" (data_batch_1..5) or "test" (test_batch).

  Returns:
    (images uint8 [N, 32, 32, 3], labels int32 [N]).
  """
  if split not in _CIFAR10_FILES:
    raise ValueError(f"split={split!r} for dataset 'cifar10', allowed: {sorted(_CIFAR10_FILES)}")
  batch_dir = cifar10_batch_dir(source_dir)
  images, labels = [], []
  for file_name in _CIFAR10_FILES[split]:
    path = os.path.join(batch_dir, file_name)
    with open(path, "rb") as f:
      # The batches were pickled by Python 2: keys come back as bytes.
      batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch.get(b"data", batch.get("data")), dtype=np.uint8)
    batch_labels = batch.get(b"labels", batch.get("labels"))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or batch_labels is None \
        or len(batch_labels) != data.shape[0]:
      raise ValueError(f"CIFAR-10 batch {path}: expected 'data' uint8 [N, 3072] and N 'labels', "
                       f"got data shape {data.shape}")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue) in row-major pixel order.
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(np.asarray(batch_labels, dtype=np.int32))
  return np.concatenate(images), np.concatenate(labels)


# ----------------------------------------------------------------- builders

def _decode_in_order(paths: Sequence[str], chunk: int = 256) -> Iterator[np.ndarray]:
  """Decodes images with `imagenet_eval_crop` on a thread pool, yielding in order.

  PIL releases the GIL while decoding and resizing, so threads use all cores;
  chunking bounds the number of decoded images held in memory.
  """
  workers = max(1, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for start in range(0, len(paths), chunk):
      yield from pool.map(imagenet_eval_crop, paths[start:start + chunk])


@functools.cache
def builder_classes() -> dict[str, type]:
  """Public dataset name -> its tfds builder class.

  The classes subclass tfds' builders, so they are defined on first use: tensorflow_datasets
  takes ~1 s to import and only a non-embedded dataset needs it.
  """
  import tensorflow_datasets as tfds

  _VERSION = tfds.core.Version("1.0.0")


  class _IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MNIST-style IDX files in the manual directory (see `MNIST_LAYOUT`)."""

    VERSION = _VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place the IDX files as {MNIST_LAYOUT}."
    DATASET_NAME = ""
    IMAGE_SHAPE = (28, 28, 1)
    NUM_CLASSES = 10

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(
          builder=self,
          description=f"{self.DATASET_NAME} read from local IDX files.",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
              "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
          }),
          supervised_keys=("image", "label"),
          # Keep the file order so that index i of a split is example i of the source.
          disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      source_dir = os.fspath(dl_manager.manual_dir)
      return {split: self._generate_examples(*idx_split_files(self.DATASET_NAME, source_dir, split))
              for split in ("train", "test")}

    def _generate_examples(self, images_path: str, labels_path: str):
      images, labels = idx.read_idx_pair(images_path, labels_path)
      if images.shape[1:] != self.IMAGE_SHAPE:
        raise ValueError(f"IDX file {images_path}: images of shape {images.shape[1:]}, expected "
                         f"{self.IMAGE_SHAPE} for {self.DATASET_NAME}")
      if labels.size and (labels.min() < 0 or labels.max() >= self.NUM_CLASSES):
        raise ValueError(f"IDX file {labels_path}: labels span [{labels.min()}, {labels.max()}], "
                         f"expected [0, {self.NUM_CLASSES - 1}]")
      for i in range(images.shape[0]):
        yield i, {"image": images[i], "label": int(labels[i])}


  class NemoMnist(_IdxBuilder):
    """MNIST from local IDX files."""

    name = "nemo_mnist"
    DATASET_NAME = "mnist"


  class NemoFashionMnist(_IdxBuilder):
    """Fashion-MNIST from local IDX files (e.g. Debian's dataset-fashion-mnist)."""

    name = "nemo_fashion_mnist"
    DATASET_NAME = "fashion_mnist"


  class NemoCifar10(tfds.core.GeneratorBasedBuilder):
    """CIFAR-10 from the python pickle batches (see `CIFAR10_LAYOUT`)."""

    name = "nemo_cifar10"
    VERSION = _VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Extract cifar-10-python.tar.gz as {CIFAR10_LAYOUT}."

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(
          builder=self,
          description="CIFAR-10 read from the local python pickle batches.",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
              "label": tfds.features.ClassLabel(names=CIFAR10_CLASS_NAMES),
          }),
          supervised_keys=("image", "label"),
          disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      source_dir = os.fspath(dl_manager.manual_dir)
      cifar10_batch_dir(source_dir)  # Fails early, naming the first missing file.
      return {split: self._generate_examples(source_dir, split) for split in ("train", "test")}

    def _generate_examples(self, source_dir: str, split: str):
      images, labels = read_cifar10_split(source_dir, split)
      for i in range(images.shape[0]):
        yield i, {"image": images[i], "label": int(labels[i])}


  @dataclasses.dataclass
  class ImagenetSplitConfig(tfds.core.BuilderConfig):
    """Which ImageNet split a `nemo_imagenet2012` config builds."""

    split: str = "validation"


  class NemoImagenet2012(tfds.core.GeneratorBasedBuilder):
    """ImageNet-1k from a local `train/<wnid>/`, `val/<wnid>/` folder tree.

    Stores each image after torchvision's eval geometry (resize 256, center crop
    224) as uint8; one builder config per split.
    """

    name = "nemo_imagenet2012"
    VERSION = _VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Arrange the JPEG files as {IMAGENET_LAYOUT}."
    BUILDER_CONFIGS = [
        ImagenetSplitConfig(name="train", split="train",
                            description="ImageNet train/<wnid>/*.JPEG only."),
        ImagenetSplitConfig(name="validation", split="validation",
                            description="ImageNet val/<wnid>/*.JPEG only."),
    ]
    NUM_CLASSES = 1000

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(
          builder=self,
          description="ImageNet-1k read from local JPEG folders, stored resized (shorter side 256, "
                      "PIL bilinear) and center-cropped to 224x224 RGB uint8.",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=(IMAGENET_CROP, IMAGENET_CROP, 3),
                                            dtype=np.uint8),
              "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
          }),
          supervised_keys=("image", "label"),
          disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      source_dir = os.fspath(dl_manager.manual_dir)
      split = self.builder_config.split
      paths, labels = imagenet_split_files(source_dir, split)
      if labels.max() >= self.NUM_CLASSES:
        raise ValueError(f"dataset 'imagenet2012': {labels.max() + 1} classes in {source_dir}, "
                         f"at most {self.NUM_CLASSES} allowed")
      return {split: self._generate_examples(paths, labels)}

    def _generate_examples(self, paths: list[str], labels: np.ndarray):
      for i, image in enumerate(_decode_in_order(paths)):
        yield i, {"image": image, "label": int(labels[i])}

  return {"mnist": NemoMnist, "fashion_mnist": NemoFashionMnist, "cifar10": NemoCifar10,
          "imagenet2012": NemoImagenet2012}


# ------------------------------------------------------------ build + read

BUILDER_NAMES = ("mnist", "fashion_mnist", "cifar10", "imagenet2012")
"""The datasets read through a tfds builder (``builder_classes``)."""


def check_layout(name: str, source_dir: Optional[str], split: str) -> None:
  """Validates the source layout before tfds is involved.

  Raises:
    ValueError: naming the expected layout and the first missing file.
  """
  if name in ("mnist", "fashion_mnist"):
    for each_split in ("train", "test"):
      idx_split_files(name, source_dir, each_split)
  elif name == "cifar10":
    cifar10_batch_dir(source_dir)
  elif name == "imagenet2012":
    split_dir = os.path.join(_require_dir(name, source_dir, IMAGENET_LAYOUT),
                             _IMAGENET_DIRS[split])
    if not os.path.isdir(split_dir):
      raise ValueError(f"dataset 'imagenet2012': missing directory {split_dir} for split "
                       f"{split!r}; expected layout {IMAGENET_LAYOUT}")
    imagenet_class_names(source_dir)
  else:
    raise ValueError(f"name={name!r} has no tfds builder, allowed: {sorted(BUILDER_NAMES)}")


def prepare_and_open(name: str, split: str, source_dir: str, data_dir: str):
  """Builds (once) the tfds dataset `name` from `source_dir` and opens `split`.

  Args:
    name: "mnist", "fashion_mnist", "cifar10" or "imagenet2012".
    split: split name, optionally with tfds slicing ("train[:1000]"); for
      imagenet2012 "train" or "validation".
    source_dir: directory in the layout the builder expects.
    data_dir: root of the cache (see `cache_dir_for`).

  Returns:
    A random-access `tfds` data source whose records are dicts with "image"
    (uint8 HWC) and "label" (int).
  """
  base_split = split.split("[", 1)[0]
  check_layout(name, source_dir, base_split)
  import tensorflow_datasets as tfds
  builder_cls = builder_classes()[name]
  tfds_data_dir = cache_dir_for(data_dir, source_dir)
  tfds_name = builder_cls.name
  kwargs = {}
  if name == "imagenet2012":
    kwargs["config"] = base_split
    tfds_name = f"{tfds_name}/{base_split}"
  builder = builder_cls(data_dir=tfds_data_dir, file_format="array_record", **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.path.realpath(source_dir)))
  return tfds.data_source(tfds_name, data_dir=tfds_data_dir, split=split, download=False)
