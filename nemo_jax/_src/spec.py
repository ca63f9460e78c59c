"""``QuantSpec``: the six quantizer settings of a run, one frozen value with NEMO's defaults.

Everything that quantizes (the evaluator's schemes, the calibration tables, export,
fine-tuning, the public building blocks) takes one :class:`QuantSpec` instead of six loose
strings, so there is one set of defaults: ``QuantSpec()`` is what a default search
evaluates (NEMO's uniform affine weights per output channel, affine integer activations
on every conv / dense input, min / max calibration; ``docs/DESIGN.md``, "Quantizer
schemes and calibration"). :data:`EMOMC` is EMOMC's (symmetric per-tensor weights, FP16
activations).

This module is a leaf: it names the allowed values of every setting and validates them;
the quantizers themselves live in ``quant.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from nemo_jax._src import quant
from nemo_jax._src import validate as v

PLACEMENTS = ("conv_inputs", "nncf")
"""Where activation quantizers sit: one per conv / dense input, or NNCF's one per tensor
(shared by its readers) plus residual-add and max-pool inputs (``layers.py``)."""

CALIBRATIONS = {
    "minmax": ("minmax", "minmax", False),
    "percentile": ("minmax", "percentile", False),
    "mse": ("mse", "mse", False),
    "bias_correction": ("minmax", "minmax", True),
    "mse_bias_correction": ("mse", "mse", True),
    "output_mse": ("output_mse", "mse", False),
    "output_mse_bias_correction": ("output_mse", "mse", True),
    "adaround": ("adaround", "mse", False),
}
"""Calibration method -> (weight method, activation method, bias correction);
``tables.py`` computes them."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How configurations are quantized (validated on construction).

  Attributes:
    weight_quant: weight quantizer (``quant.WEIGHT_MODES``); NEMO: uniform affine per
      output channel (``asymmetric_per_channel``), EMOMC: ``symmetric_per_tensor``.
    weight_range: its integer range, ``narrow`` or ``full`` (``quant.WEIGHT_RANGES``);
      None: the mode's own (narrow for symmetric, full for asymmetric).
    act_quant: integer activation quantizer (``quant.ACT_QUANTS``): ``affine`` (NEMO) or
      ``symmetric`` (zero point fixed; unsigned after ReLU).
    activation_format: what layer inputs become (``quant.ACTIVATION_FORMATS``): ``int``
      (fake-quantized at ``a_bits``; NEMO), ``fp16`` (EMOMC) or ``float32``.
    placement: where activation quantizers sit (:data:`PLACEMENTS`).
    calibration: post-training calibration (:data:`CALIBRATIONS`): ``minmax`` (NEMO) or
      a method with per-(layer, bit-width) tables (``tables.py``).

  Raises:
    ValueError naming the field, the value and the allowed values.
  """
  weight_quant: str = "asymmetric_per_channel"
  weight_range: str | None = None
  act_quant: str = "affine"
  activation_format: str = "int"
  placement: str = "conv_inputs"
  calibration: str = "minmax"

  def __post_init__(self):
    v.choice("weight_quant", self.weight_quant, quant.WEIGHT_MODES)
    v.choice("weight_range", self.weight_range, (None,) + quant.WEIGHT_RANGES)
    v.choice("act_quant", self.act_quant, quant.ACT_QUANTS)
    v.choice("activation_format", self.activation_format, quant.ACTIVATION_FORMATS)
    v.choice("placement", self.placement, PLACEMENTS)
    v.choice("calibration", self.calibration, tuple(CALIBRATIONS))
    if self.act_quant != "affine" and self.activation_format != "int":
      v.fail("act_quant", self.act_quant, f"'affine' with activation_format="
             f"{self.activation_format!r} (only integer activations have a quantizer)")

  @property
  def resolved_weight_range(self) -> str:
    """``weight_range``, or the mode's own when it is None."""
    return quant.resolve_weight_quantizer(self.weight_quant, self.weight_range)

  @property
  def int_activations(self) -> bool:
    """Whether layer inputs are integer-quantized (and need calibrated ranges)."""
    return self.activation_format == "int"

  @property
  def bias_correction(self) -> bool:
    """Whether the calibration adds a per-layer output correction."""
    return CALIBRATIONS[self.calibration][2]

  def replace(self, **changes) -> "QuantSpec":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | "QuantSpec", what: str = "quant") -> "QuantSpec":
    """A spec from its fields (unknown keys name the section and the allowed keys)."""
    if isinstance(d, QuantSpec):
      return d
    return v.dataclass_from(cls, what, d)


FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec))
"""The six settings, in order."""

NEMO = QuantSpec()
"""NEMO's quantizers: the defaults."""

EMOMC = QuantSpec(weight_quant="symmetric_per_tensor", activation_format="fp16")
"""EMOMC's quantizers: symmetric narrow per-tensor weights, FP16 activations."""
