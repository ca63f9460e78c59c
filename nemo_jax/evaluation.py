"""Calibration and batched population evaluation (accuracy enters the search as error)."""

from nemo_jax._src.distributed import initialize, population_mesh
from nemo_jax._src.evaluate import (Calibration, EvalResult, Evaluator, calibrate, evaluate,
                                    load_calibration, load_or_calibrate, save_calibration)

__all__ = [
    "Calibration", "EvalResult", "Evaluator", "calibrate", "evaluate", "initialize",
    "load_calibration", "load_or_calibrate", "population_mesh", "save_calibration",
]
