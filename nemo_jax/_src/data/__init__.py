"""Datasets from local files only: embedded Fashion-MNIST subset, IDX, CIFAR-10, ImageNet.

See `datasets.py` for the public API; `builders.py` holds the TensorFlow-free
tfds builders (imported lazily, on the first non-embedded load).
"""

from __future__ import annotations

from nemo_jax._src.data.datasets import (
    DATASETS,
    DatasetSpec,
    augment,
    capped_stratified_subset,
    disjoint_stratified_subsets,
    held_out_split,
    iterate_batches,
    load_embedded,
    load_split,
    open_image_files,
    open_split,
    preprocess,
    stratified_subset,
)
from nemo_jax._src.data.files import ImageFiles, decode_files, decode_threads
from nemo_jax._src.data.idx import read_idx, read_idx_pair, write_idx

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "ImageFiles",
    "augment",
    "decode_files",
    "decode_threads",
    "capped_stratified_subset",
    "disjoint_stratified_subsets",
    "held_out_split",
    "iterate_batches",
    "load_embedded",
    "load_split",
    "open_image_files",
    "open_split",
    "preprocess",
    "read_idx",
    "read_idx_pair",
    "stratified_subset",
    "write_idx",
]
