"""EMOMC (Wang et al., 2021): pruning + quantization co-optimisation, two stages.

Stage I builds a library of pruned + retrained models, one per keep ratio p::

    meta = nemo_jax.emomc.build_library({"model": "resnet20", "keep_range": "0.2:0.8:0.05",
                                         "out_dir": "runs/lib", "steps": 2,
                                         "steps_per_stage": 25, "schedule": "chain"})

Stage II is a search whose config sets ``library="runs/lib"`` (per-layer weight bits and
p, FP16 activations; ``experiments/configs/emomc_default.py``); :func:`emomc_report`
then builds EMOMC's table (energy per dataflow, size per coding at <= 0.5% loss).
All objectives are minimised (accuracy enters as error).
"""

from nemo_jax._src.emomc.io import (DENSE_KEEP, LIBRARY_FILE, check_keep_ratios, library_ratios,
                                    library_table, load_entry, parse_keep_range, ratio_key,
                                    read_library)
from nemo_jax._src.emomc.masks import is_kernel_path, kernel_leaves, magnitude_masks, nonzero_counts
from nemo_jax._src.emomc.report import (DEFAULT_MAX_LOSS, TABLE_CSV, TABLE_JSON, choose,
                                        emomc_report, format_table)
from nemo_jax._src.emomc.trainer import (SCHEDULES, LibraryConfig, build_library,
                                         library_config)
from nemo_jax._src.problem import check_library_config

__all__ = [
    "DEFAULT_MAX_LOSS", "DENSE_KEEP", "LIBRARY_FILE", "LibraryConfig", "SCHEDULES", "TABLE_CSV",
    "TABLE_JSON", "build_library", "check_keep_ratios", "check_library_config", "choose",
    "emomc_report", "format_table", "is_kernel_path", "kernel_leaves", "library_config", "library_ratios",
    "library_table", "load_entry", "magnitude_masks", "nonzero_counts", "parse_keep_range",
    "ratio_key", "read_library",
]
