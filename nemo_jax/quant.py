"""Fake quantizers and magnitude pruning with bit-widths / keep ratios as traced arrays."""

from nemo_jax._src.quant import (ACTIVATION_FORMATS, FLOAT_BITS, MAX_BITS, MIN_BITS,
                                 WEIGHT_MODES, affine_params, keep_count, magnitude_ranks,
                                 prune, quantize_affine, quantize_symmetric, quantize_weight,
                                 round_fp16, symmetric_step, weight_integers)

__all__ = [
    "ACTIVATION_FORMATS", "FLOAT_BITS", "MAX_BITS", "MIN_BITS", "WEIGHT_MODES",
    "affine_params", "keep_count", "magnitude_ranks", "prune", "quantize_affine",
    "quantize_symmetric", "quantize_weight", "round_fp16", "symmetric_step",
    "weight_integers",
]
