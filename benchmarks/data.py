"""Subset-first ImageNet-layout decoding: throughput and peak memory (prints ONE JSON line).

Generates a 1,000-class ImageNet-layout tree of small JPEG files in a temporary
directory (``--per-class`` images per class, varied sizes), lists the split (no image
opened), picks a stratified ``--subset`` per class (the paper's fitness subset: 5) and
decodes ONLY those files with the package's decoder (torchvision's evaluation geometry,
one thread per core). Reported: decode images/s with all threads and, as the baseline
measured in the same run, with one thread; the cached re-read; the listing time; peak
RSS of the process and the decoded stack's bytes (150,528 B per image).

    python benchmarks/data.py [--classes 1000] [--per-class 6] [--subset 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from nemo_jax import data  # noqa: E402


def write_tree(root: str, classes: int, per_class: int, seed: int = 0) -> int:
  """``root/train/<wnid>/*.JPEG`` of small random images; returns the number written."""
  rng = np.random.default_rng(seed)
  count = 0
  for c in range(classes):
    directory = os.path.join(root, "train", f"n{c:08d}")
    os.makedirs(directory)
    for i in range(per_class):
      w, h = (int(v) for v in rng.integers(48, 96, 2))
      pixels = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
      Image.fromarray(pixels).resize((w, h), Image.BILINEAR).save(
          os.path.join(directory, f"{i:04d}.JPEG"), "JPEG", quality=85)
      count += 1
  return count


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--per-class", type=int, default=6)
  p.add_argument("--subset", type=int, default=5)
  args = p.parse_args(argv)
  tmp = tempfile.mkdtemp(prefix="nemo_jax_data_bench_")
  try:
    t0 = time.perf_counter()
    total = write_tree(tmp, args.classes, args.per_class)
    generate_s = time.perf_counter() - t0
    rss_before = peak_rss_mb()

    t0 = time.perf_counter()
    images, labels = data.open_image_files("train", data_dir=os.path.join(tmp, "cache"),
                                               source_dir=tmp)
    list_s = time.perf_counter() - t0
    idx = data.stratified_subset(labels, args.subset, seed=0)
    chosen = images.subset(idx)

    threads = data.decode_threads()
    paths = chosen.paths
    baseline_n = min(len(paths), 500)  # the baseline: one thread, the same files
    t0 = time.perf_counter()
    data.decode_files(paths[:baseline_n], threads=1)
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data.decode_files(paths, threads=threads)
    decode_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    decoded = np.asarray(chosen)   # the search's path: decode the chosen files, cache them
    first_s = time.perf_counter() - t0
    rss_after = peak_rss_mb()
    t0 = time.perf_counter()
    again = np.asarray(chosen)     # a second search: from the cache
    cached_s = time.perf_counter() - t0
    assert np.array_equal(again, decoded)

    per_image = decoded[0].nbytes
    out = {
        "benchmark": "data", "classes": args.classes, "files_in_split": total,
        "subset_per_class": args.subset, "decoded_images": int(len(decoded)),
        "threads": threads,
        "decode_images_per_s": round(len(decoded) / decode_s, 1),
        "decode_images_per_s_1_thread": round(baseline_n / single_s, 1),
        "speedup_over_1_thread": round((len(decoded) / decode_s) / (baseline_n / single_s), 2),
        "first_read_images_per_s": round(len(decoded) / first_s, 1),
        "cached_read_images_per_s": round(len(decoded) / max(cached_s, 1e-9), 1),
        "list_seconds": round(list_s, 3), "generate_seconds": round(generate_s, 2),
        "decoded_mb": round(len(decoded) * per_image / 2**20, 1),
        "peak_rss_mb_before_decode": round(rss_before, 1),
        "peak_rss_mb": round(rss_after, 1),
        "full_split_decoded_mb_avoided": round(total * per_image / 2**20, 1),
    }
    print(json.dumps(out))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
