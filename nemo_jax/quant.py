"""Fake quantizers and magnitude pruning with bit-widths / keep ratios as traced arrays."""

from nemo_jax._src.quant import (ACT_QUANTS, ACTIVATION_FORMATS, FLOAT_BITS, MAX_BITS,
                                 MIN_BITS, WEIGHT_MODES, WEIGHT_RANGES, act_params,
                                 affine_params, default_weight_range, keep_count,
                                 magnitude_ranks, prune, quantize_affine, quantize_symmetric,
                                 quantize_weight, round_fp16, symmetric_act_params,
                                 symmetric_params, weight_integers)

__all__ = [
    "ACT_QUANTS", "ACTIVATION_FORMATS", "FLOAT_BITS", "MAX_BITS", "MIN_BITS", "WEIGHT_MODES",
    "WEIGHT_RANGES", "act_params", "affine_params", "default_weight_range", "keep_count",
    "magnitude_ranks", "prune", "quantize_affine", "quantize_symmetric", "quantize_weight",
    "round_fp16", "symmetric_act_params", "symmetric_params", "weight_integers",
]
