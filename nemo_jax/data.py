"""Datasets from local files only (no downloads): see ``nemo_jax._src.data``."""

from nemo_jax._src.data import (DATASETS, DatasetSpec, ImageFiles, augment, decode_files,
                                decode_threads, disjoint_stratified_subsets, iterate_batches,
                                load_embedded, load_split, open_image_files, open_split,
                                preprocess, read_idx, stratified_subset, write_idx)

__all__ = [
    "DATASETS", "DatasetSpec", "ImageFiles", "augment", "decode_files", "decode_threads",
    "disjoint_stratified_subsets", "iterate_batches", "load_embedded", "load_split",
    "open_image_files", "open_split", "preprocess", "read_idx", "stratified_subset",
    "write_idx",
]
