"""Tests of nemo_jax._src.data: IDX reader, tfds builders, embedded data, utilities.

Every builder is exercised on small files written here in the real layout.
"""

from __future__ import annotations

import gzip
import os
import pickle
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nemo_jax._src.data import datasets, idx
from nemo_jax._src.data.datasets import (DATASETS, augment, iterate_batches, load_split,
                                         preprocess, stratified_subset)

# ------------------------------------------------------------------ helpers


def _write_mnist_layout(directory, rng, n_train=12, n_test=5, compress=True):
  """Writes MNIST-style IDX files; returns the arrays written."""
  os.makedirs(directory, exist_ok=True)
  ext = ".gz" if compress else ""
  arrays = {}
  for split, prefix, count in (("train", "train", n_train), ("test", "t10k", n_test)):
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    idx.write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), images)
    idx.write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
    arrays[split] = (images, labels)
  return arrays


def _write_cifar_layout(root, rng, per_batch=3, n_test=4):
  """Writes python-pickle CIFAR-10 batches under root/cifar-10-batches-py/."""
  batch_dir = os.path.join(root, "cifar-10-batches-py")
  os.makedirs(batch_dir)
  rows = {"train": [], "test": []}
  labels = {"train": [], "test": []}
  for name, split, count in ([(f"data_batch_{i}", "train", per_batch) for i in range(1, 6)]
                             + [("test_batch", "test", n_test)]):
    data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
    batch_labels = [int(v) for v in rng.integers(0, 10, size=count)]
    # Same structure as the official files (bytes keys, list of int labels).
    with open(os.path.join(batch_dir, name), "wb") as f:
      pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": batch_labels,
                   b"filenames": [b"x.png"] * count}, f, protocol=2)
    rows[split].append(data)
    labels[split].extend(batch_labels)
  return ({s: np.concatenate(rows[s]) for s in rows},
          {s: np.asarray(labels[s], dtype=np.int32) for s in labels})


def _smooth_image(width, height, mode, seed):
  """A deterministic image with gradients (so resampling errors would show)."""
  yy, xx = np.mgrid[0:height, 0:width]
  r = (xx * 255 // max(1, width - 1))
  g = (yy * 255 // max(1, height - 1))
  b = ((xx + yy + seed * 37) % 256)
  array = np.stack([r, g, b], axis=-1).astype(np.uint8)
  image = Image.fromarray(array, "RGB")
  return image.convert(mode)


_IMAGENET_FILES = {
    # (split dir, wnid, file name): (width, height, mode)
    ("train", "n01440764", "a.JPEG"): (300, 260, "RGB"),
    ("train", "n01440764", "b.JPEG"): (260, 300, "RGB"),
    ("train", "n01443537", "c.JPEG"): (320, 240, "L"),
    ("val", "n01440764", "v1.JPEG"): (512, 300, "RGB"),
    ("val", "n01443537", "v2.JPEG"): (257, 380, "RGB"),
    ("val", "n01443537", "v3.JPEG"): (400, 400, "L"),
}


def _write_imagenet_layout(root):
  for seed, ((sub, wnid, file_name), (width, height, mode)) in enumerate(_IMAGENET_FILES.items()):
    directory = os.path.join(root, sub, wnid)
    os.makedirs(directory, exist_ok=True)
    _smooth_image(width, height, mode, seed).save(os.path.join(directory, file_name), "JPEG",
                                                  quality=95)


# ---------------------------------------------------------------------- IDX


@settings(deadline=None, max_examples=25)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
       dtype=st.sampled_from(["uint8", "int8", "int16", "int32", "float32", "float64"]),
       compress=st.booleans(), seed=st.integers(0, 2**16))
def test_idx_roundtrip(tmp_path_factory, shape, dtype, compress, seed):
  array = (np.random.default_rng(seed).normal(size=shape) * 100).astype(dtype)
  path = tmp_path_factory.mktemp("idx") / "a.idx"
  idx.write_idx(path, array, compress=compress)
  loaded = idx.read_idx(path)
  assert loaded.dtype == np.dtype(dtype) and loaded.shape == array.shape
  np.testing.assert_array_equal(loaded, array)


def test_idx_header_by_hand(tmp_path):
  # Hand-made file: magic 0x00000803 (uint8, 3 dims), dims 2x1x3, big-endian.
  content = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 3]) + bytes(range(6))
  (tmp_path / "raw").write_bytes(content)
  (tmp_path / "zipped").write_bytes(gzip.compress(content))
  for name in ("raw", "zipped"):
    array = idx.read_idx(tmp_path / name, expected_ndim=3)
    np.testing.assert_array_equal(array, np.arange(6, dtype=np.uint8).reshape(2, 1, 3))
  # int32 big-endian payload.
  content = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2]) + (258).to_bytes(4, "big") + (-1).to_bytes(
      4, "big", signed=True)
  (tmp_path / "ints").write_bytes(content)
  np.testing.assert_array_equal(idx.read_idx(tmp_path / "ints"), [258, -1])


@pytest.mark.parametrize("content, message", [
    (bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]), "expected 0x00 0x00"),
    (bytes([0, 0, 7, 1, 0, 0, 0, 1, 5]), "dtype byte 0x07"),
    (bytes([0, 0, 8, 1, 0, 0, 0, 3, 5]), "needs 3 data bytes, file has 1"),
    (bytes([0, 0, 8]), "too short"),
    (bytes([0, 0, 8, 2, 0, 0, 0, 1]), "too short for a header"),
])
def test_idx_bad_files(tmp_path, content, message):
  path = tmp_path / "bad"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=message):
    idx.read_idx(path)


def test_idx_wrong_ndim_and_pair_mismatch(tmp_path):
  idx.write_idx(tmp_path / "img.gz", np.zeros((3, 28, 28), np.uint8))
  idx.write_idx(tmp_path / "lab.gz", np.zeros((4,), np.uint8))
  with pytest.raises(ValueError, match="ndim=3.*expected ndim=1"):
    idx.read_idx(tmp_path / "img.gz", expected_ndim=1)
  with pytest.raises(ValueError, match="3 images.*4 labels"):
    idx.read_idx_pair(tmp_path / "img.gz", tmp_path / "lab.gz")
  with pytest.raises(ValueError, match="does not exist"):
    idx.read_idx(tmp_path / "nope.gz")


# ----------------------------------------------------------------- builders


@pytest.mark.parametrize("name, compress", [("mnist", True), ("fashion_mnist", False)])
def test_idx_builders(tmp_path, name, compress):
  rng = np.random.default_rng(0)
  arrays = _write_mnist_layout(tmp_path / "src", rng, compress=compress)
  cache = str(tmp_path / "cache")
  for split in ("train", "test"):
    images, labels = load_split(name, split, data_dir=cache, source_dir=str(tmp_path / "src"))
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images, arrays[split][0][..., None])
    np.testing.assert_array_equal(labels, arrays[split][1])
  # tfds split slicing keeps the source order.
  images, labels = load_split(name, "train[3:7]", data_dir=cache, source_dir=str(tmp_path / "src"))
  np.testing.assert_array_equal(images[..., 0], arrays["train"][0][3:7])
  # The cache is array_record files in <data_dir>/<source hash>/nemo_<name>/.
  built = os.listdir(os.path.join(cache, os.listdir(cache)[0], f"nemo_{name}", "1.0.0"))
  assert any(".array_record" in f for f in built)
  assert "tensorflow" not in sys.modules


def test_cache_keyed_by_source(tmp_path):
  cache = str(tmp_path / "cache")
  first = _write_mnist_layout(tmp_path / "a", np.random.default_rng(1), n_train=10, n_test=3)
  second = _write_mnist_layout(tmp_path / "b", np.random.default_rng(2), n_train=10, n_test=3)
  images_a, _ = load_split("mnist", "test", data_dir=cache, source_dir=str(tmp_path / "a"))
  images_b, _ = load_split("mnist", "test", data_dir=cache, source_dir=str(tmp_path / "b"))
  np.testing.assert_array_equal(images_a[..., 0], first["test"][0])
  np.testing.assert_array_equal(images_b[..., 0], second["test"][0])


def test_cifar10_builder(tmp_path):
  rng = np.random.default_rng(3)
  rows, labels = _write_cifar_layout(str(tmp_path / "src"), rng)
  for source in (tmp_path / "src", tmp_path / "src" / "cifar-10-batches-py"):
    for split in ("train", "test"):
      images, got_labels = load_split("cifar10", split, data_dir=str(tmp_path / "cache"),
                                      source_dir=str(source))
      assert images.shape == (rows[split].shape[0], 32, 32, 3) and images.dtype == np.uint8
      np.testing.assert_array_equal(got_labels, labels[split])
      # Hand layout: row = 1024 red values, 1024 green, 1024 blue, each row-major.
      for n, y, x, c in ((0, 0, 0, 0), (1, 5, 7, 2), (2, 31, 30, 1), (-1, 17, 3, 0)):
        assert images[n, y, x, c] == rows[split][n, c * 1024 + y * 32 + x]
  assert "tensorflow" not in sys.modules


def _torchvision_eval(path):
  """Reference: torchvision's ImageFolder loader + eval transforms, HWC numpy."""
  from torchvision import transforms  # pylint: disable=import-outside-toplevel
  with Image.open(path) as opened:
    image = opened.convert("RGB")
  geometry = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
  cropped = geometry(image)
  tensor = transforms.Compose([
      transforms.ToTensor(),
      transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(cropped)
  return np.asarray(cropped), tensor.numpy().transpose(1, 2, 0)


def test_imagenet_builder_matches_torchvision(tmp_path):
  source = str(tmp_path / "imagenet")
  _write_imagenet_layout(source)
  cache = str(tmp_path / "cache")
  images, labels = load_split("imagenet2012", "val", data_dir=cache, source_dir=source)
  assert images.shape == (3, 224, 224, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [0, 1, 1])  # Sorted wnids: n01440764 -> 0.
  train_images, train_labels = load_split("imagenet2012", "train", data_dir=cache,
                                          source_dir=source)
  np.testing.assert_array_equal(train_labels, [0, 0, 1])
  val_paths = [os.path.join(source, sub, wnid, f) for (sub, wnid, f) in _IMAGENET_FILES
               if sub == "val"]
  train_paths = [os.path.join(source, sub, wnid, f) for (sub, wnid, f) in _IMAGENET_FILES
                 if sub == "train"]
  normalized = preprocess("imagenet2012", images)
  assert normalized.dtype == np.float32
  torchvision = pytest.importorskip("torchvision")
  del torchvision
  for i, path in enumerate(val_paths):
    crop_reference, tensor_reference = _torchvision_eval(path)
    np.testing.assert_array_equal(images[i], crop_reference)
    np.testing.assert_allclose(normalized[i], tensor_reference, atol=1e-5)
  for i, path in enumerate(train_paths):
    np.testing.assert_array_equal(train_images[i], _torchvision_eval(path)[0])
  assert "tensorflow" not in sys.modules


def test_imagenet_eval_crop_by_hand(tmp_path):
  from nemo_jax._src.data import builders  # pylint: disable=import-outside-toplevel
  image = _smooth_image(512, 300, "RGB", 0)
  # Shorter side 300 -> 256, longer int(256 * 512 / 300) = 436; crop offsets
  # top = round((256 - 224) / 2) = 16, left = round((436 - 224) / 2) = 106.
  resized = np.asarray(image.resize((436, 256), Image.BILINEAR))
  np.testing.assert_array_equal(builders.imagenet_eval_crop(image), resized[16:240, 106:330])
  # Portrait, odd margins: 257x380 -> 256 x int(256 * 380 / 257) = 378; top = round(77) = 77,
  # left = round(16) = 16.
  image = _smooth_image(257, 380, "RGB", 1)
  resized = np.asarray(image.resize((256, 378), Image.BILINEAR))
  np.testing.assert_array_equal(builders.imagenet_eval_crop(image), resized[77:301, 16:240])
  # Hand normalisation of one pixel.
  pixel = np.full((1, 224, 224, 3), 200, np.uint8)
  expected = (200 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(preprocess("imagenet2012", pixel)[0, 5, 7], expected, rtol=1e-6)


# ------------------------------------------------------------- layout errors


def test_missing_idx_file_named(tmp_path):
  _write_mnist_layout(tmp_path, np.random.default_rng(0), n_train=2, n_test=2)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\[\.gz\].*expected layout"):
    load_split("mnist", "train", data_dir=str(tmp_path / "c"), source_dir=str(tmp_path))
  with pytest.raises(ValueError, match="not a directory"):
    load_split("mnist", "train", data_dir=str(tmp_path / "c"), source_dir=str(tmp_path / "x"))
  with pytest.raises(ValueError, match="source_dir=None"):
    load_split("mnist", "train", data_dir=str(tmp_path / "c"))


def test_missing_cifar_batch_named(tmp_path):
  _write_cifar_layout(str(tmp_path), np.random.default_rng(0), per_batch=1, n_test=1)
  os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
  with pytest.raises(ValueError, match="data_batch_3.*expected layout"):
    load_split("cifar10", "test", data_dir=str(tmp_path / "c"), source_dir=str(tmp_path))


def test_bad_imagenet_layouts(tmp_path):
  cache = str(tmp_path / "c")
  os.makedirs(tmp_path / "only_train" / "train" / "n0")
  _smooth_image(300, 300, "RGB", 0).save(tmp_path / "only_train" / "train" / "n0" / "a.JPEG")
  with pytest.raises(ValueError, match=r"missing directory .*only_train/val"):
    load_split("imagenet2012", "validation", data_dir=cache,
               source_dir=str(tmp_path / "only_train"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match=r"missing directory .*empty/train"):
    load_split("imagenet2012", "train", data_dir=cache, source_dir=str(tmp_path / "empty"))
  os.makedirs(tmp_path / "only_train" / "val" / "n9")
  with pytest.raises(ValueError, match="n9 is not among the 1 training classes"):
    load_split("imagenet2012", "val", data_dir=cache, source_dir=str(tmp_path / "only_train"))


def test_unknown_name_and_split():
  with pytest.raises(ValueError, match="allowed: .*'cifar10'.*'fashion_mnist_embedded'"):
    load_split("svhn", "train")
  with pytest.raises(ValueError, match=r"split='validation'.*allowed: \['train', 'test'\]"):
    load_split("mnist", "validation", source_dir="/nonexistent")
  with pytest.raises(ValueError, match="split='val'"):
    load_split("fashion_mnist_embedded", "val")


# ------------------------------------------------------------ embedded data


def test_embedded_fashion_mnist():
  for split, per_class in (("train", 1000), ("test", 200)):
    images, labels = load_split("fashion_mnist_embedded", split)
    assert images.shape == (10 * per_class, 28, 28, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
    assert images.std() > 50  # Real pictures, not blank placeholders.
  assert os.path.getsize(datasets.EMBEDDED_FILE) < 10.5e6
  assert os.path.isfile(os.path.join(datasets.ASSETS_DIR, "FASHION_MNIST_LICENSE.txt"))


@pytest.mark.skipif(not os.path.isdir(datasets.DEBIAN_FASHION_MNIST_DIR),
                    reason="Debian dataset-fashion-mnist not installed")
def test_embedded_matches_debian_source():
  with np.load(datasets.EMBEDDED_FILE) as data:
    test_indices = data["test_indices"]
    x_test, y_test = data["x_test"], data["y_test"]
  source = datasets.DEBIAN_FASHION_MNIST_DIR
  images, labels = idx.read_idx_pair(os.path.join(source, "t10k-images-idx3-ubyte.gz"),
                                     os.path.join(source, "t10k-labels-idx1-ubyte.gz"))
  np.testing.assert_array_equal(x_test, images[test_indices])
  np.testing.assert_array_equal(y_test, labels[test_indices])
  np.testing.assert_array_equal(test_indices, stratified_subset(labels, 200, seed=1))


# ------------------------------------------------------------------ utilities


@settings(deadline=None, max_examples=40)
@given(counts=st.lists(st.integers(0, 12), min_size=1, max_size=6),
       per_class=st.integers(0, 6), seed=st.integers(0, 1000))
def test_stratified_subset_properties(counts, per_class, seed):
  labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
  present = [c for c in counts if c > 0]
  if present and min(present) < per_class:
    with pytest.raises(ValueError, match="fewer than per_class"):
      stratified_subset(labels, per_class, seed)
    return
  chosen = stratified_subset(labels, per_class, seed)
  assert np.all(np.diff(chosen) > 0)  # Sorted and unique.
  np.testing.assert_array_equal(np.bincount(labels[chosen], minlength=len(counts)),
                                [per_class if c > 0 else 0 for c in counts])
  np.testing.assert_array_equal(chosen, stratified_subset(labels, per_class, seed))
  if 0 in counts and per_class > 0:
    with pytest.raises(ValueError, match="has 0 examples"):
      stratified_subset(labels, per_class, seed, num_classes=len(counts))


def test_preprocess_by_hand():
  images = np.zeros((2, 28, 28, 1), np.uint8)
  images[1] = 255
  out = preprocess("fashion_mnist", images)
  assert out.dtype == np.float32 and out.shape == images.shape
  np.testing.assert_allclose(out[0, 0, 0, 0], -0.2860 / 0.3530, rtol=1e-6)
  np.testing.assert_allclose(out[1, 3, 3, 0], (1 - 0.2860) / 0.3530, rtol=1e-6)
  np.testing.assert_allclose(preprocess("mnist", images)[1, 0, 0, 0], (1 - 0.1307) / 0.3081,
                             rtol=1e-6)
  cifar = np.full((1, 32, 32, 3), 51, np.uint8)
  np.testing.assert_allclose(
      preprocess("cifar10", cifar)[0, 0, 0],
      (0.2 - np.array([0.4914, 0.4822, 0.4465])) / np.array([0.2470, 0.2435, 0.2616]), rtol=1e-5)
  with pytest.raises(ValueError, match="dtype=float32"):
    preprocess("mnist", images.astype(np.float32))
  with pytest.raises(ValueError, match=r"allowed: \[N, 32, 32, 3\]"):
    preprocess("cifar10", images)


def test_iterate_batches():
  images = np.arange(10)[:, None] * np.ones((1, 3), np.int64)
  labels = np.arange(10)
  batches = list(iterate_batches(images, labels, 4, 7))
  assert [b[0].shape for b in batches] == [(4, 3), (4, 3)]
  seen = np.concatenate([b[1] for b in batches])
  assert len(set(seen.tolist())) == 8
  for batch_images, batch_labels in batches:
    np.testing.assert_array_equal(batch_images[:, 0], batch_labels)  # Pairs stay together.
  # Same seed, same order; no shuffle keeps source order; keep the short batch.
  np.testing.assert_array_equal(seen, np.concatenate(
      [b[1] for b in iterate_batches(images, labels, 4, 7)]))
  ordered = list(iterate_batches(images, labels, 4, 0, shuffle=False, drop_last=False))
  np.testing.assert_array_equal(np.concatenate([b[1] for b in ordered]), labels)
  assert ordered[-1][1].shape == (2,)
  import jax  # pylint: disable=import-outside-toplevel
  for key in (jax.random.PRNGKey(3), jax.random.key(3)):
    keyed = np.concatenate([b[1] for b in iterate_batches(images, labels, 5, key)])
    assert sorted(keyed.tolist()) == list(range(10))
  with pytest.raises(ValueError, match="batch_size=0"):
    next(iterate_batches(images, labels, 0, 0))


def _candidates(image, pad, allow_flip):
  """All crops (and flips) `augment` may produce for one image, by brute force."""
  height, width = image.shape[:2]
  padded = np.zeros((height + 2 * pad, width + 2 * pad) + image.shape[2:], image.dtype)
  padded[pad:pad + height, pad:pad + width] = image
  for top in range(2 * pad + 1):
    for left in range(2 * pad + 1):
      crop = padded[top:top + height, left:left + width]
      yield crop, False
      if allow_flip:
        yield crop[:, ::-1], True


@pytest.mark.parametrize("name, size, channels", [("mnist", 28, 1), ("fashion_mnist", 28, 1),
                                                  ("cifar10", 32, 3)])
def test_augment_brute_force(name, size, channels):
  rng = np.random.default_rng(5)
  # Distinct random pixels make every (offset, flip) candidate distinguishable.
  images = rng.integers(1, 256, size=(24, size, size, channels), dtype=np.uint8)
  out = augment(name, images, 11)
  assert out.shape == images.shape and out.dtype == images.dtype
  np.testing.assert_array_equal(out, augment(name, images, 11))
  spec = DATASETS[name]
  flips = []
  for original, augmented in zip(images, out):
    matches = [flip for crop, flip in _candidates(original, spec.crop_padding,
                                                  spec.horizontal_flip)
               if np.array_equal(crop, augmented)]
    assert matches, "output is not a padded crop (or its mirror) of the input"
    flips.append(matches[0])
  if spec.horizontal_flip:
    assert 0 < sum(flips) < len(flips)
  with pytest.raises(ValueError, match="has no augmentation"):
    augment("imagenet2012", images, 0)


# ------------------------------------------------------- subset-first ImageNet files


def test_imagenet_files_decode_only_what_is_indexed(tmp_path, monkeypatch):
  from nemo_jax._src.data import files  # pylint: disable=import-outside-toplevel
  source = str(tmp_path / "imagenet")
  _write_imagenet_layout(source)
  decoded = []
  original = files.decode_image
  monkeypatch.setattr(files, "decode_image", lambda p: decoded.append(p) or original(p))
  images, labels = load_split("imagenet2012", "val", data_dir=str(tmp_path / "c"),
                              source_dir=source)
  assert isinstance(images, files.ImageFiles) and images.shape == (3, 224, 224, 3)
  assert decoded == []                      # listing opens no image
  pre = preprocess("imagenet2012", images)  # lazy too
  assert decoded == [] and pre.dtype == np.float32
  stack = images[np.array([2, 0])]
  assert sorted(os.path.basename(p) for p in decoded) == ["v1.JPEG", "v3.JPEG"]
  np.testing.assert_array_equal(stack[0], builders_crop(images.paths[2]))
  np.testing.assert_array_equal(pre[np.array([2, 0])], preprocess("imagenet2012", stack))
  decoded.clear()
  images[np.array([2, 0])]                  # cached stack: no decode
  assert decoded == []
  view = images.subset(np.array([1]))
  assert decoded == [] and len(view) == 1
  np.testing.assert_array_equal(np.asarray(view)[0], images[1])


def builders_crop(path):
  from nemo_jax._src.data import builders  # pylint: disable=import-outside-toplevel
  return builders.imagenet_eval_crop(path)


def test_corrupt_jpeg_and_empty_class_directory_are_named(tmp_path):
  source = tmp_path / "imagenet"
  _write_imagenet_layout(str(source))
  bad = source / "val" / "n01443537" / "v9.JPEG"
  bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  images, _ = load_split("imagenet2012", "val", data_dir=str(tmp_path / "c"),
                         source_dir=str(source))
  index = images.paths.index(os.path.realpath(bad))
  images[0]                                 # other files still decode
  with pytest.raises(ValueError, match=r"cannot decode image file .*n01443537/v9\.JPEG"):
    images[index]
  os.makedirs(source / "train" / "n09999999")
  with pytest.raises(ValueError, match=r"class directory .*train/n09999999 has no image"):
    load_split("imagenet2012", "train", data_dir=str(tmp_path / "c"), source_dir=str(source))
