"""Quantization schemes: how a configuration turns a float model into a quantized one.

A :class:`QuantScheme` is a NamedTuple of three pure functions, injected into the one
:class:`~nemo_jax._src.evaluator.Evaluator` (as big_vision injects a ``predict_fn``):

* ``prepare(model, variables, input_shape) -> prepared``: once per model, on the host
  (a ``flax.struct`` pytree); everything a
  member needs that does not depend on its configuration (float kernels in execution
  order, magnitude ranks, calibrated ranges, stacked library entries). The evaluator
  puts ``prepared`` on the device(s) once.
* ``member_weights(prepared, config) -> (variables, kernels)``: per member (traced): the
  variables the model runs with and every layer's pruned + quantized kernel, computed
  ONCE per configuration and reused for every image batch.
* ``member_inputs(prepared, config) -> quantize_input(x, i)``: per member (traced): the
  activation quantizer of layer ``i``'s input.

Two instances (``docs/DESIGN.md``, "Quantization schemes"):

* :func:`ptq` (NEMO): one float checkpoint; kernels are magnitude-pruned to the
  member's ``keep`` and fake-quantized with ``weight_quant``; inputs are fake-quantized
  to ``a_bits`` with calibrated ranges (``activation_format="int"``), rounded to FP16 or
  left in float32.
* :func:`library` (EMOMC): a library of pre-pruned, retrained models stacked ``[K, ...]``;
  each member gathers the entry of its ``keep`` (its kernels are already pruned, its
  biases and BatchNorm are the retrained ones), then quantizes the kernels.

In every scheme a bit-width ``>= 32`` means float, so the FP32 configuration (all 32,
keep 1) is the float reference of the same evaluator.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax._src import quant
from nemo_jax._src.calibration import Calibration
from nemo_jax._src.config import QuantConfig
from nemo_jax._src.layers import PLACEMENTS, LayerInfo
from nemo_jax._src.models import trace_quantizers

KEEP_MATCH_TOLERANCE = 1e-6


class QuantScheme(NamedTuple):
  """How configurations quantize a model (see the module docstring).

  Attributes:
    name: ``"ptq"`` or ``"library"`` (or a user's name), for reports.
    prepare: ``(model, variables, input_shape) -> prepared`` pytree (host, once per
      model).
    member_weights: ``(prepared, config) -> (variables, kernels)`` (traced, per member).
    member_inputs: ``(prepared, config) -> quantize_input(x, i)`` (traced, per member).
    variables_template: ``prepared -> variables`` of ONE model (shapes for tracing).
    allowed_keep: the keep ratios the scheme can evaluate (a library's), or None (any).
    placement: where activation quantizers sit (``layers.PLACEMENTS``); ``a_bits`` has
      one entry per activation quantizer of that placement.
    member_pruned: ``(prepared, config) -> (variables, kernels)`` before weight
      quantization (pruned / selected float kernels), or None; with ``weight_quant``
      and ``activation_format`` it lets ``export.py`` write real integers.
    weight_quant: the weight quantizer mode (``quant.WEIGHT_MODES``), or None.
    activation_format: ``quant.ACTIVATION_FORMATS``, or None.
    weight_range: the weight integer range (``quant.WEIGHT_RANGES``; resolved).
    act_quant: the integer activation quantizer (``quant.ACT_QUANTS``).
    calibration: the calibration method (``tables.CALIBRATIONS``).
    member_weight_kwargs: ``(prepared, config) -> [dict]``, per layer the keyword
      arguments of ``quant.quantize_weight`` / ``quant.weight_integers`` beyond
      ``(kernel, bits, weight_quant)`` (range, table clip ratio), or None (none).
    member_act_ranges: ``(prepared, config) -> (lo[La], hi[La])`` the member's
      activation ranges (per-bit tables looked up), or None.
    member_outputs: ``(prepared, config, kernels) -> on_output(y, i)`` adding a
      per-layer output correction (bias correction), or None.
  """
  name: str
  prepare: Callable[[nn.Module, Any, tuple[int, int, int]], Any]
  member_weights: Callable[[Any, QuantConfig], tuple[Any, list]]
  member_inputs: Callable[[Any, QuantConfig], Callable]
  variables_template: Callable[[Any], Any]
  allowed_keep: tuple[float, ...] | None = None
  placement: str = "conv_inputs"
  member_pruned: Callable[[Any, QuantConfig], tuple[Any, list]] | None = None
  weight_quant: str | None = None
  activation_format: str | None = None
  weight_range: str | None = None
  act_quant: str = "affine"
  calibration: str = "minmax"
  member_weight_kwargs: Callable[[Any, QuantConfig], list] | None = None
  member_act_ranges: Callable[[Any, QuantConfig], tuple] | None = None
  member_outputs: Callable[[Any, QuantConfig, list], Callable] | None = None


# --------------------------------------------------------------------------- tracing


def kernel_paths(layers: Sequence[LayerInfo]) -> tuple[tuple[str, ...], ...]:
  """The ``params`` path of every layer's kernel, execution order."""
  return tuple(("params",) + tuple(info.name.split("/")) + ("kernel",) for info in layers)


def get_path(tree, path: Sequence[str]):
  for k in path:
    tree = tree[k]
  return tree


def _one_member(config: QuantConfig, i: int):
  keep = jnp.asarray(config.keep)
  return config.w_bits[i], keep if keep.ndim == 0 else keep[i]


def _input_quantizer(activation_format: str, a_bits, lo=None, hi=None,
                     act_quant: str = "affine") -> Callable:
  """``quantize_input(x, i)`` of one member."""
  if activation_format == "float32":
    return lambda x, i: x
  if activation_format == "fp16":
    return lambda x, i: quant.round_fp16(x, a_bits[i])
  return lambda x, i: quant.quantize_affine(x, a_bits[i], lo[i], hi[i], act_quant=act_quant)


def _check_formats(weight_quant: str, activation_format: str, placement: str,
                   weight_range: str | None = None, act_quant: str = "affine") -> str:
  """Checks the quantizer settings; returns the resolved weight range."""
  if placement not in PLACEMENTS:
    raise ValueError(f"placement={placement!r} is invalid; allowed: {PLACEMENTS}")
  weight_range = quant.resolve_weight_quantizer(weight_quant, weight_range)
  if act_quant not in quant.ACT_QUANTS:
    raise ValueError(f"act_quant={act_quant!r} is invalid; allowed: {quant.ACT_QUANTS}")
  if activation_format not in quant.ACTIVATION_FORMATS:
    raise ValueError(f"activation_format={activation_format!r} is invalid; allowed: "
                     f"{quant.ACTIVATION_FORMATS}")
  return weight_range


# --------------------------------------------------------------------------- schemes


@flax.struct.dataclass
class PTQPrepared:
  """What :func:`ptq` precomputes: float variables, kernels (execution order), magnitude
  ranks (pruning is one comparison per member), calibrated ranges ``lo/hi [L]`` or None,
  and the calibration tables (``tables.CalibrationTables``) or None (``minmax``)."""
  variables: Any
  kernels: list
  ranks: list
  lo: Any = None
  hi: Any = None
  tables: Any = None


@flax.struct.dataclass
class LibraryPrepared:
  """What :func:`library` precomputes: entries stacked ``[K, ...]``, their ratios ``[K]``
  and the kernel paths (static)."""
  variables: Any
  ratios: Any
  paths: tuple = flax.struct.field(pytree_node=False, default=())



def ptq(calibration: Calibration | None, weight_quant: str = "symmetric_per_channel",
        activation_format: str = "int", placement: str = "conv_inputs",
        weight_range: str | None = None, act_quant: str = "affine",
        tables=None) -> QuantScheme:
  """NEMO's post-training quantization of one float checkpoint.

  Args:
    calibration: activation ranges ``lo[La]``/``hi[La]`` (required for ``"int"``),
      calibrated with the same ``placement``.
    weight_quant: one of ``quant.WEIGHT_MODES``.
    activation_format: one of ``quant.ACTIVATION_FORMATS``.
    placement: one of ``layers.PLACEMENTS``.
    weight_range: one of ``quant.WEIGHT_RANGES`` or None (the mode's default).
    act_quant: one of ``quant.ACT_QUANTS`` (integer activations).
    tables: ``tables.CalibrationTables`` (per layer and bit-width: weight clip ratios,
      activation ranges, bias-correction statistics), looked up by each member's bits
      inside jit; None: ``minmax`` (the calibration's ranges, full weight ranges).

  Returns:
    The scheme; ``prepare(model, variables)`` takes the float variables.

  Raises:
    ValueError naming a bad setting.
  """
  from nemo_jax._src import tables as tables_lib
  weight_range = _check_formats(weight_quant, activation_format, placement, weight_range,
                                act_quant)
  if activation_format == "int" and calibration is None:
    raise ValueError("calibration: required for activation_format='int' (integer "
                     "activations need calibrated ranges); allowed: a Calibration")
  method = "minmax" if tables is None else tables.method

  def prepare(model, variables, input_shape):
    layers, acts = trace_quantizers(model, input_shape, _shapes(variables), placement)
    kernels = [jnp.asarray(get_path(variables, p)) for p in kernel_paths(layers)]
    lo = hi = None
    if calibration is not None:
      if calibration.num_layers != len(acts):
        raise ValueError(f"calibration: {calibration.num_layers} activation ranges, the model "
                         f"has {len(acts)} activation quantizers ({placement}); allowed: "
                         "equal counts")
      lo, hi = calibration.lo, calibration.hi
    if tables is not None:
      tables.check(len(layers), len(acts))
    return PTQPrepared(variables=variables, kernels=kernels,
                       ranks=[quant.magnitude_ranks(k) for k in kernels], lo=lo, hi=hi,
                       tables=tables)

  def member_pruned(prepared, config):
    kernels = []
    for i, k in enumerate(prepared.kernels):
      _, keep = _one_member(config, i)
      kernels.append(quant.prune(k, keep, prepared.ranks[i]))
    return prepared.variables, kernels

  def member_weight_kwargs(prepared, config):
    L = len(prepared.kernels)
    clips = tables_lib.weight_clips(prepared.tables, config.w_bits, L)
    ups = tables_lib.weight_ups(prepared.tables, config.w_bits, L)
    return [{"weight_range": weight_range, "clip": c, "up": u} for c, u in zip(clips, ups)]

  def member_weights(prepared, config):
    variables, kernels = member_pruned(prepared, config)
    kwargs = member_weight_kwargs(prepared, config)
    return variables, [quant.quantize_weight(k, config.w_bits[i], weight_quant, **kwargs[i])
                       for i, k in enumerate(kernels)]

  def member_act_ranges(prepared, config):
    return tables_lib.act_ranges(prepared.tables, config.a_bits, prepared.lo, prepared.hi)

  def member_inputs(prepared, config):
    lo, hi = member_act_ranges(prepared, config)
    return _input_quantizer(activation_format, config.a_bits, lo, hi, act_quant)

  member_outputs = None
  if tables is not None and tables.bias is not None:
    def member_outputs(prepared, config, kernels):
      return tables_lib.bias_correction(prepared.tables, prepared.kernels, kernels)

  return QuantScheme("ptq", prepare, member_weights, member_inputs,
                     lambda prepared: _shapes(prepared.variables), None, placement,
                     member_pruned, weight_quant, activation_format, weight_range, act_quant,
                     method, member_weight_kwargs, member_act_ranges, member_outputs)


def stack_variables(entries: Sequence[Any]):
  """``[K, ...]`` stack of K variable trees of the same model."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *entries)


def library(ratios: Sequence[float], weight_quant: str = "symmetric_per_tensor",
            activation_format: str = "fp16", placement: str = "conv_inputs",
            weight_range: str | None = None) -> QuantScheme:
  """EMOMC stage II: members pick a pre-pruned model of a library by their keep ratio.

  Args:
    ratios: the K keep ratios of the stacked entries (a member's ``keep`` selects the
      nearest one; configurations are validated to hold exactly these ratios).
    weight_quant: EMOMC: ``"symmetric_per_tensor"`` (``step = max|w| / (2^(q-1) - 1)``).
    activation_format: EMOMC: ``"fp16"``; ``"float32"`` keeps them in float32.
      (``"int"`` would need one calibration per library entry and is not offered.)
    placement: one of ``layers.PLACEMENTS`` (where the FP16 rounding happens).
    weight_range: one of ``quant.WEIGHT_RANGES`` or None (the mode's default; EMOMC:
      narrow).

  Returns:
    The scheme; ``prepare(model, variables)`` takes the entries stacked ``[K, ...]``
    (:func:`stack_variables`). Memory: ``K * 4 * params`` bytes resident.
  """
  weight_range = _check_formats(weight_quant, activation_format, placement, weight_range)
  if activation_format == "int":
    raise ValueError("activation_format='int' is invalid with a library; allowed: 'fp16' "
                     "(EMOMC) or 'float32'")
  ratios = np.asarray(ratios, np.float32)

  def one(stacked):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype),
                        stacked)

  def prepare(model, stacked, input_shape):
    if len(ratios) != len(jax.tree.leaves(stacked)[0]):
      raise ValueError(f"ratios: {len(ratios)} keep ratios for "
                       f"{len(jax.tree.leaves(stacked)[0])} stacked entries; allowed: one each")
    layers, _ = trace_quantizers(model, input_shape, one(stacked), placement)
    return LibraryPrepared(variables=stacked, ratios=jnp.asarray(ratios),
                           paths=kernel_paths(layers))

  def member_pruned(prepared, config):
    index = jnp.argmin(jnp.abs(prepared.ratios - jnp.asarray(config.keep).reshape(())))
    variables = jax.tree.map(lambda v: v[index], prepared.variables)
    return variables, [get_path(variables, p) for p in prepared.paths]

  def member_weight_kwargs(prepared, config):
    return [{"weight_range": weight_range} for _ in prepared.paths]

  def member_weights(prepared, config):
    variables, kernels = member_pruned(prepared, config)
    return variables, [quant.quantize_weight(k, config.w_bits[i], weight_quant, weight_range)
                       for i, k in enumerate(kernels)]

  def member_inputs(prepared, config):
    return _input_quantizer(activation_format, config.a_bits)

  return QuantScheme("library", prepare, member_weights, member_inputs,
                     lambda prepared: one(prepared.variables),
                     tuple(float(r) for r in ratios), placement, member_pruned, weight_quant,
                     activation_format, weight_range, "affine", "minmax",
                     member_weight_kwargs)


def _shapes(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
