"""ImageNet-layout folder trees, subset first: list files, decode only what is used.

``imagenet_split_files`` lists a split's files and labels without opening any image;
:class:`ImageFiles` is a lazy ``[N, 224, 224, 3]`` uint8 view of such a list: indexing
(``x[i]``, ``x[a:b]``, ``x[idx]``) decodes only the files it selects (threads,
torchvision's evaluation geometry) and ``subset`` narrows the view without decoding.
Decoded subsets up to ``cache_max_images`` images are cached as ``.npy`` files keyed by
the file list (path, size, mtime), so a second search skips decoding
(``docs/DESIGN.md``, "Data at scale").
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from typing import Callable, Optional, Sequence

import numpy as np

IMAGENET_LAYOUT = "<source_dir>/train/<wnid>/*.JPEG and <source_dir>/val/<wnid>/*.JPEG"
_IMAGENET_DIRS = {"train": "train", "validation": "val"}
_IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")

IMAGENET_RESIZE = 256
IMAGENET_CROP = 224
CACHE_MAX_IMAGES = 20000
"""Decoded subsets up to this many images are cached (20,000 x 150 KB = 3 GB)."""


def _require_dir(name: str, source_dir: Optional[str], layout: str) -> str:
  """Checks that `source_dir` is an existing directory; returns its real path."""
  if source_dir is None:
    raise ValueError(f"source_dir=None for dataset {name!r}: pass the directory holding {layout}")
  if not os.path.isdir(source_dir):
    raise ValueError(f"source_dir={str(source_dir)!r} for dataset {name!r} is not a directory; "
                     f"expected layout {layout}")
  return os.path.realpath(source_dir)


def _is_image_file(file_name: str) -> bool:
  return file_name.lower().endswith(_IMAGE_EXTENSIONS) and not file_name.startswith(".")


def imagenet_class_names(source_dir: Optional[str]) -> list[str]:
  """Sorted wnids of `train/` (of `val/` when there is no `train/`).

  Class index i is the i-th entry, as in torchvision's ImageFolder.

  Raises:
    ValueError: neither `train/` nor `val/` holds class directories.
  """
  source_dir = _require_dir("imagenet2012", source_dir, IMAGENET_LAYOUT)
  for sub in ("train", "val"):
    directory = os.path.join(source_dir, sub)
    if os.path.isdir(directory):
      wnids = sorted(entry.name for entry in os.scandir(directory)
                     if entry.is_dir() and not entry.name.startswith("."))
      if wnids:
        return wnids
  raise ValueError(f"dataset 'imagenet2012': missing directory {os.path.join(source_dir, 'train')}"
                   f" (or {os.path.join(source_dir, 'val')}) with <wnid> sub-directories in "
                   f"source_dir={source_dir!r}; expected layout {IMAGENET_LAYOUT}")


def imagenet_split_files(source_dir: Optional[str], split: str) -> tuple[list[str], np.ndarray]:
  """Lists the image files of one ImageNet split with their class indices.

  Args:
    source_dir: the ImageNet root (see module docstring for the layout).
    split: "train" or "validation" (directory `val/`).

  Returns:
    (paths sorted by (wnid, file name), labels int32).

  Raises:
    ValueError: missing split directory, a class directory without images, or
      a `val/` wnid that is not a training class.
  """
  if split not in _IMAGENET_DIRS:
    raise ValueError(f"split={split!r} for dataset 'imagenet2012', allowed: "
                     f"{sorted(_IMAGENET_DIRS)}")
  wnids = imagenet_class_names(source_dir)
  source_dir = os.path.realpath(source_dir)
  split_dir = os.path.join(source_dir, _IMAGENET_DIRS[split])
  if not os.path.isdir(split_dir):
    raise ValueError(f"dataset 'imagenet2012': missing directory {split_dir} for split "
                     f"{split!r}; expected layout {IMAGENET_LAYOUT}")
  class_index = {wnid: i for i, wnid in enumerate(wnids)}
  split_wnids = sorted(entry.name for entry in os.scandir(split_dir)
                       if entry.is_dir() and not entry.name.startswith("."))
  if not split_wnids:
    raise ValueError(f"dataset 'imagenet2012': directory {split_dir} has no <wnid> "
                     f"sub-directories; expected layout {IMAGENET_LAYOUT}")
  paths, labels = [], []
  for wnid in split_wnids:
    if wnid not in class_index:
      raise ValueError(f"dataset 'imagenet2012': class directory {os.path.join(split_dir, wnid)} "
                       f"is not among the {len(wnids)} training classes")
    class_dir = os.path.join(split_dir, wnid)
    files = sorted(f for f in os.listdir(class_dir) if _is_image_file(f))
    if not files:
      raise ValueError(f"dataset 'imagenet2012': class directory {class_dir} has no image files "
                       f"(*.JPEG); expected layout {IMAGENET_LAYOUT}")
    paths.extend(os.path.join(class_dir, f) for f in files)
    labels.extend([class_index[wnid]] * len(files))
  return paths, np.asarray(labels, dtype=np.int32)


def imagenet_eval_crop(image, resize: int = IMAGENET_RESIZE, crop: int = IMAGENET_CROP) -> np.ndarray:
  """torchvision's evaluation geometry: Resize(256) then CenterCrop(224), as uint8.

  Mirrors `torchvision.transforms.Resize(resize)` on a PIL image (shorter side
  to `resize`, longer side `int(resize * long / short)`, PIL bilinear) and
  `CenterCrop(crop)` (offsets `int(round((size - crop) / 2))`). Scaling to
  [0, 1] and normalising is left to `preprocess`.

  Args:
    image: a path or a PIL image (converted to RGB, as ImageFolder's loader does).
    resize: target shorter side.
    crop: side of the square center crop.

  Returns:
    uint8 [crop, crop, 3].
  """
  from PIL import Image  # Imported here: PIL is only needed for ImageNet.

  if not isinstance(image, Image.Image):
    with Image.open(image) as opened:
      image = opened.convert("RGB")
  else:
    image = image.convert("RGB")
  width, height = image.size
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = resize, int(resize * long / short)
  new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
  image = image.resize((new_width, new_height), Image.BILINEAR)
  top = int(round((new_height - crop) / 2.0))
  left = int(round((new_width - crop) / 2.0))
  if top < 0 or left < 0:
    raise ValueError(f"resize={resize} is smaller than crop={crop}")
  array = np.asarray(image, dtype=np.uint8)
  return np.ascontiguousarray(array[top:top + crop, left:left + crop])



def cache_dir_for(data_dir: str, source_dir: str) -> str:
  """The tfds data_dir for one source directory: `<data_dir>/<sha1 of its real path>`.

  Keying the cache by source keeps two different source trees built with the
  same `data_dir` apart. Files changed in place are not detected: delete the
  cache directory to rebuild.
  """
  digest = hashlib.sha1(os.path.realpath(source_dir).encode()).hexdigest()[:16]
  return os.path.join(os.path.expanduser(data_dir), digest)


def decode_image(path: str) -> np.ndarray:
  """``imagenet_eval_crop`` of one file; a file PIL cannot read is a ValueError naming it."""
  try:
    return imagenet_eval_crop(path)
  except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError, truncated
    raise ValueError(f"dataset 'imagenet2012': cannot decode image file {path} "
                     f"({type(e).__name__}: {e}); allowed: a readable JPEG / PNG "
                     "(replace or delete the file)") from None


def decode_threads() -> int:
  """Threads decoding images (PIL releases the GIL while decoding and resizing)."""
  return max(1, os.cpu_count() or 1)


def decode_files(paths: Sequence[str], threads: Optional[int] = None) -> np.ndarray:
  """Decodes ``paths`` (``decode_image``) on a thread pool, in order: uint8 ``[N, 224, 224, 3]``."""
  out = np.empty((len(paths), IMAGENET_CROP, IMAGENET_CROP, 3), np.uint8)
  if not len(paths):
    return out
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads or decode_threads()) as pool:
    for i, image in enumerate(pool.map(decode_image, paths)):
      out[i] = image
  return out


def _cache_key(paths: Sequence[str]) -> str:
  digest = hashlib.sha256(f"{IMAGENET_RESIZE},{IMAGENET_CROP}".encode())
  for path in paths:
    st = os.stat(path)
    digest.update(f"\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
  return digest.hexdigest()[:32]


class ImageFiles:
  """Lazy ``[N, 224, 224, 3]`` uint8 images of a file list (decoded on indexing).

  Indexing follows numpy and returns decoded arrays: ``x[i]`` one image, ``x[a:b]`` /
  ``x[idx]`` a stack (only those files are decoded; a stack of at most
  ``cache_max_images`` is cached under ``cache_dir``). :meth:`subset` and
  :meth:`map` return lazy views; ``np.asarray(x)`` decodes every file of the view.

  Args:
    paths: image files.
    cache_dir: where decoded stacks are cached (None: no cache).
    transform: applied to each decoded uint8 stack (e.g. ``preprocess``); None: none.
    cache_max_images: largest stack cached.
  """

  def __init__(self, paths: Sequence[str], cache_dir: Optional[str] = None,
               transform: Optional[Callable] = None,
               cache_max_images: int = CACHE_MAX_IMAGES):
    self.paths = list(paths)
    self.cache_dir = cache_dir
    self.transform = transform
    self.cache_max_images = cache_max_images

  def _view(self, paths=None, transform=None) -> "ImageFiles":
    return ImageFiles(self.paths if paths is None else paths, self.cache_dir,
                      self.transform if transform is None else transform,
                      self.cache_max_images)

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self.paths), IMAGENET_CROP, IMAGENET_CROP, 3)

  @property
  def ndim(self) -> int:
    return 4

  @property
  def dtype(self):
    return np.dtype(np.uint8) if self.transform is None else np.dtype(np.float32)

  def __len__(self) -> int:
    return len(self.paths)

  def subset(self, index) -> "ImageFiles":
    """The lazy view of ``paths[index]`` (an index array or slice); decodes nothing."""
    if isinstance(index, slice):
      return self._view(self.paths[index])
    return self._view([self.paths[int(i)] for i in np.asarray(index).reshape(-1)])

  def map(self, transform: Callable) -> "ImageFiles":
    """A lazy view whose stacks go through ``transform`` after the current one."""
    inner = self.transform
    fn = transform if inner is None else (lambda x: transform(inner(x)))
    return self._view(transform=fn)

  def decoded(self) -> np.ndarray:
    """Every image of the view, decoded (uint8, before ``transform``), cached if small."""
    if not self.paths:
      return decode_files([])
    path = None
    if self.cache_dir is not None and len(self.paths) <= self.cache_max_images:
      path = os.path.join(self.cache_dir, f"decoded-{_cache_key(self.paths)}.npy")
      if os.path.exists(path):
        try:
          cached = np.load(path)
          if cached.shape == self.shape:
            return cached
        except (OSError, ValueError):
          pass  # a damaged cache file is rebuilt
    images = decode_files(self.paths)
    if path is not None:
      os.makedirs(self.cache_dir, exist_ok=True)
      tmp = f"{path}.{os.getpid()}.tmp.npy"
      np.save(tmp, images)
      os.replace(tmp, path)
    return images

  def __array__(self, dtype=None, copy=None):
    x = self.decoded()
    if self.transform is not None:
      x = self.transform(x)
    return np.asarray(x) if dtype is None else np.asarray(x, dtype)

  def __getitem__(self, index):
    if isinstance(index, (int, np.integer)):
      return np.asarray(self.subset([index]))[0]
    return np.asarray(self.subset(index))

  def __repr__(self) -> str:
    return f"ImageFiles({len(self.paths)} files, cache_dir={self.cache_dir!r})"
