"""Writes the embedded Fashion-MNIST subset shipped in nemo_jax/assets/.

Reads Debian's Fashion-MNIST IDX files (package `dataset-fashion-mnist`,
/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz),
draws a stratified subset with a fixed seed (default 1,000 training images and
200 test images per class) and saves it with `np.savez_compressed`:

  x_train uint8 [N, 28, 28, 1], y_train uint8 [N], train_indices int32 [N]
  x_test  uint8 [M, 28, 28, 1], y_test  uint8 [M], test_indices  int32 [M]

`*_indices` are the positions of the chosen images in the original files, so
the subset can be checked against (or regenerated from) the source.

Usage: /work/venv/bin/python scripts/make_embedded_data.py [--train-per-class 1000]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from nemo_jax._src.data.datasets import (  # noqa: E402  (needs the sys.path entry above)
    DEBIAN_FASHION_MNIST_DIR, EMBEDDED_FILE, stratified_subset)
from nemo_jax._src.data.idx import read_idx_pair  # noqa: E402


def make_subset(source_dir: str, split_prefix: str, per_class: int,
                seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads one split and returns (images, labels, indices) of its stratified subset.

  Args:
    source_dir: directory of the IDX .gz files.
    split_prefix: "train" or "t10k".
    per_class: images per class.
    seed: numpy seed of the subset draw.

  Returns:
    (uint8 [10 * per_class, 28, 28, 1], uint8 labels, int32 source indices).
  """
  images, labels = read_idx_pair(
      os.path.join(source_dir, f"{split_prefix}-images-idx3-ubyte.gz"),
      os.path.join(source_dir, f"{split_prefix}-labels-idx1-ubyte.gz"))
  indices = stratified_subset(labels, per_class, seed, num_classes=10)
  return images[indices], labels[indices].astype(np.uint8), indices.astype(np.int32)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source-dir", default=DEBIAN_FASHION_MNIST_DIR)
  parser.add_argument("--out", default=EMBEDDED_FILE)
  parser.add_argument("--train-per-class", type=int, default=1000)
  parser.add_argument("--test-per-class", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  # Different seeds per split so the two draws are independent.
  x_train, y_train, train_indices = make_subset(args.source_dir, "train", args.train_per_class,
                                                args.seed)
  x_test, y_test, test_indices = make_subset(args.source_dir, "t10k", args.test_per_class,
                                             args.seed + 1)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, x_train=x_train, y_train=y_train, train_indices=train_indices,
                      x_test=x_test, y_test=y_test, test_indices=test_indices)
  size = os.path.getsize(args.out)
  print(f"wrote {args.out}: train {x_train.shape}, test {x_test.shape}, "
        f"{size / 1e6:.2f} MB")
  if size > 10_500_000:
    raise SystemExit(f"{args.out} is {size} bytes, above the ~10 MB budget")


if __name__ == "__main__":
  main()
