"""Calibration, quantization schemes and the one batched population evaluator.

Accuracy enters the search as error (minimised). An :class:`Evaluator` takes a
:class:`QuantScheme`: :func:`ptq_scheme` (NEMO: calibrated post-training quantization of
one checkpoint) or :func:`library_scheme` (EMOMC: pre-pruned library entries)::

    calib = evaluation.calibrate(model, variables, calib_images)
    ev = evaluation.Evaluator(model, variables, evaluation.ptq_scheme(calib), images, labels)
    ev(configs).top1, ev.evaluate_float().top1

Calibration beyond NEMO's min / max (``CALIBRATIONS``) is a table per (layer,
bit-width), computed once (:func:`compute_tables`, cached by
:func:`load_or_compute_tables`) and passed as ``ptq_scheme(calib, tables=tables)``.
"""

from nemo_jax._src.calibration import (Calibration, calibrate, fingerprint, load_calibration,
                                       load_or_calibrate, save_calibration)
from nemo_jax._src.distributed import initialize, population_mesh
from nemo_jax._src.evaluator import (ACTIVATION_FACTOR, STRATEGIES, EvalResult, Evaluator,
                                     evaluate, member_apply_fn, member_bytes,
                                     member_logits)
from nemo_jax._src.run.sensitivity import compute as sensitivity_table
from nemo_jax._src.run.sensitivity import probe_configs as sensitivity_probes
from nemo_jax._src.schemes import (BUILTIN_SCHEMES, MemberQuantizers, QuantScheme,
                                   member_inputs, member_weights, stack_variables)
from nemo_jax._src.spec import EMOMC, NEMO, QuantSpec
from nemo_jax._src.schemes import library as library_scheme
from nemo_jax._src.schemes import ptq as ptq_scheme
from nemo_jax._src.tables import CALIBRATIONS, CalibrationTables, compute_tables
from nemo_jax._src.tables import load_or_compute as load_or_compute_tables

__all__ = [
    "ACTIVATION_FACTOR", "BUILTIN_SCHEMES", "CALIBRATIONS", "EMOMC", "MemberQuantizers", "NEMO",
    "QuantSpec", "member_inputs", "member_weights", "sensitivity_probes", "sensitivity_table", "Calibration", "CalibrationTables", "EvalResult", "Evaluator", "QuantScheme", "STRATEGIES", "calibrate",
    "compute_tables", "evaluate", "fingerprint", "initialize", "library_scheme", "load_calibration",
    "load_or_calibrate", "load_or_compute_tables", "member_apply_fn", "member_bytes", "member_logits", "population_mesh",
    "ptq_scheme", "save_calibration", "stack_variables",
]
