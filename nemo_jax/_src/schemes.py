"""Quantization schemes: how a configuration turns a float model into a quantized one.

A :class:`QuantScheme` is its :class:`~nemo_jax._src.spec.QuantSpec` plus a few pure
functions, injected into the one :class:`~nemo_jax._src.evaluator.Evaluator` (as
big_vision injects a ``predict_fn``):

* ``prepare(model, variables, input_shape) -> prepared``: once per model, on the host
  (a ``flax.struct`` pytree): everything a member needs that does not depend on its
  configuration (float kernels in execution order, magnitude ranks, calibrated ranges,
  stacked library entries). The evaluator puts ``prepared`` on the device(s) once.
* ``member_pruned(prepared, config) -> (variables, kernels)``: per member (traced): the
  variables the model runs with and every layer's pruned (or selected) float kernel.
* ``member_quantizers(prepared, config) -> MemberQuantizers``: per member (traced): the
  keyword arguments of every layer's weight quantizer beyond ``(kernel, bits, mode)``
  (range, clip ratio, learned rounding) and the activation ranges.
* optionally ``member_outputs(prepared, config, kernels) -> on_output(y, i)``: a
  per-layer output correction (bias correction).

:func:`member_weights` and :func:`member_inputs` derive the quantized kernels (computed
ONCE per configuration, reused for every image batch) and the input quantizer from
those and the spec; export and fine-tuning use the same pieces, so they write and train
exactly what the evaluator scored.

Two instances (``docs/DESIGN.md``, "Quantization schemes"), registered by name in
:data:`BUILTIN_SCHEMES` the same way a user's scheme is (``Registries.with_scheme``):

* :func:`ptq` (NEMO): one float checkpoint; kernels are magnitude-pruned to the
  member's ``keep`` and fake-quantized; inputs are fake-quantized to ``a_bits`` with
  calibrated ranges (``activation_format="int"``), rounded to FP16 or left in float32.
* :func:`library` (EMOMC): a library of pre-pruned, retrained models stacked ``[K, ...]``;
  each member gathers the entry of its ``keep`` (its kernels are already pruned, its
  biases and BatchNorm are the retrained ones), then quantizes the kernels.

In every scheme a bit-width ``>= 32`` means float, so the FP32 configuration (all 32,
keep 1) is the float reference of the same evaluator.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax._src import quant
from nemo_jax._src import tables as tables_lib
from nemo_jax._src.calibration import Calibration
from nemo_jax._src.layers import LayerInfo, input_quantizer
from nemo_jax._src.models import trace_quantizers
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.spec import EMOMC, NEMO, QuantSpec

KEEP_MATCH_TOLERANCE = 1e-6


class MemberQuantizers(NamedTuple):
  """One member's quantizer parameters (traced).

  Attributes:
    weight_kwargs: per layer, the keyword arguments of ``quant.quantize_weight`` /
      ``quant.weight_integers`` beyond ``(kernel, bits, weight_quant)``.
    act_lo, act_hi: float32 ``[La]`` activation ranges (None without integer
      activations).
  """
  weight_kwargs: list
  act_lo: Any = None
  act_hi: Any = None


class QuantScheme(NamedTuple):
  """How configurations quantize a model (see the module docstring).

  Attributes:
    name: ``"ptq"`` or ``"library"`` (or a user's name), for reports.
    spec: the quantizers (weight / activation quantizer, placement, calibration).
    prepare: ``(model, variables, input_shape) -> prepared`` pytree (host, once per
      model).
    member_pruned: ``(prepared, config) -> (variables, kernels)``: the pruned / selected
      float kernels (traced, per member).
    member_quantizers: ``(prepared, config) -> MemberQuantizers`` (traced, per member).
    variables_template: ``prepared -> variables`` of ONE model (shapes for tracing).
    allowed_keep: the keep ratios the scheme can evaluate (a library's), or None (any).
    member_outputs: ``(prepared, config, kernels) -> on_output(y, i)`` adding a
      per-layer output correction (bias correction), or None.
  """
  name: str
  spec: QuantSpec
  prepare: Callable[[nn.Module, Any, tuple[int, int, int]], Any]
  member_pruned: Callable[[Any, QuantConfig], tuple[Any, list]]
  member_quantizers: Callable[[Any, QuantConfig], MemberQuantizers]
  variables_template: Callable[[Any], Any]
  allowed_keep: tuple[float, ...] | None = None
  member_outputs: Callable[[Any, QuantConfig, list], Callable] | None = None


def quantize_kernels(scheme: QuantScheme, config: QuantConfig, kernels,
                     quantizers: MemberQuantizers) -> list:
  """Every layer's fake-quantized kernel of one member (``kernels``: ``member_pruned``'s)."""
  mode = scheme.spec.weight_quant
  return [quant.quantize_weight(k, config.w_bits[i], mode, **quantizers.weight_kwargs[i])
          for i, k in enumerate(kernels)]


def member_weights(scheme: QuantScheme, prepared, config: QuantConfig):
  """``(variables, kernels)``: the member's variables and quantized kernels (traced)."""
  variables, kernels = scheme.member_pruned(prepared, config)
  return variables, quantize_kernels(scheme, config, kernels,
                                     scheme.member_quantizers(prepared, config))


def member_inputs(scheme: QuantScheme, prepared, config: QuantConfig,
                  quantizers: MemberQuantizers | None = None) -> Callable:
  """``quantize_input(x, q)`` of one member (traced)."""
  quantizers = quantizers or scheme.member_quantizers(prepared, config)
  return input_quantizer(scheme.spec, config.a_bits, quantizers.act_lo, quantizers.act_hi)


# --------------------------------------------------------------------------- tracing


def kernel_paths(layers: Sequence[LayerInfo]) -> tuple[tuple[str, ...], ...]:
  """The ``params`` path of every layer's kernel, execution order."""
  return tuple(("params",) + tuple(info.name.split("/")) + ("kernel",) for info in layers)


def get_path(tree, path: Sequence[str]):
  for k in path:
    tree = tree[k]
  return tree


def _member_keep(config: QuantConfig, i: int):
  keep = jnp.asarray(config.keep)
  return keep if keep.ndim == 0 else keep[i]


# --------------------------------------------------------------------------- schemes


@flax.struct.dataclass
class PTQPrepared:
  """What :func:`ptq` precomputes: float variables, kernels (execution order), magnitude
  ranks (pruning is one comparison per member), calibrated ranges ``lo/hi [La]`` or None,
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


def ptq(calibration: Calibration | None, spec: QuantSpec = NEMO, tables=None) -> QuantScheme:
  """NEMO's post-training quantization of one float checkpoint.

  With the defaults (``QuantSpec()``, ``tables=None``) this is exactly what a default
  search evaluates.

  Args:
    calibration: activation ranges ``lo[La]`` / ``hi[La]`` (required for integer
      activations), calibrated with the same placement.
    spec: the quantizers (default: NEMO's).
    tables: ``tables.CalibrationTables`` of ``spec.calibration`` (per layer and
      bit-width: weight clip ratios, activation ranges, bias-correction statistics),
      looked up by each member's bits inside jit; None: ``minmax`` (the calibration's
      ranges, full weight ranges).

  Returns:
    The scheme; ``prepare(model, variables)`` takes the float variables.

  Raises:
    ValueError naming a bad setting.
  """
  if spec.int_activations and calibration is None:
    raise ValueError("calibration: required for activation_format='int' (integer "
                     "activations need calibrated ranges); allowed: a Calibration")
  if (tables is None) != (spec.calibration == "minmax"):
    raise ValueError(f"tables: {'missing' if tables is None else tables.method!r} for "
                     f"calibration={spec.calibration!r}; allowed: the tables of that "
                     "calibration (tables.load_or_compute), None for 'minmax'")
  weight_range = spec.resolved_weight_range

  def prepare(model, variables, input_shape):
    layers, acts = trace_quantizers(model, input_shape, _shapes(variables), spec.placement)
    kernels = [jnp.asarray(get_path(variables, p)) for p in kernel_paths(layers)]
    lo = hi = None
    if calibration is not None:
      if calibration.num_layers != len(acts):
        raise ValueError(f"calibration: {calibration.num_layers} activation ranges, the model "
                         f"has {len(acts)} activation quantizers ({spec.placement}); allowed: "
                         "equal counts")
      lo, hi = calibration.lo, calibration.hi
    if tables is not None:
      tables.check(len(layers), len(acts))
    return PTQPrepared(variables=variables, kernels=kernels,
                       ranks=[quant.magnitude_ranks(k) for k in kernels], lo=lo, hi=hi,
                       tables=tables)

  def member_pruned(prepared, config):
    kernels = [quant.prune(k, _member_keep(config, i), prepared.ranks[i])
               for i, k in enumerate(prepared.kernels)]
    return prepared.variables, kernels

  def member_quantizers(prepared, config):
    L = len(prepared.kernels)
    clips = tables_lib.weight_clips(prepared.tables, config.w_bits, L)
    ups = tables_lib.weight_ups(prepared.tables, config.w_bits, L)
    lo, hi = tables_lib.act_ranges(prepared.tables, config.a_bits, prepared.lo, prepared.hi)
    return MemberQuantizers([{"weight_range": weight_range, "clip": c, "up": u}
                             for c, u in zip(clips, ups)], lo, hi)

  member_outputs = None
  if tables is not None and tables.bias is not None:
    def member_outputs(prepared, config, kernels):
      return tables_lib.bias_correction(prepared.tables, prepared.kernels, kernels)

  return QuantScheme("ptq", spec, prepare, member_pruned, member_quantizers,
                     lambda prepared: _shapes(prepared.variables), None, member_outputs)


def stack_variables(entries: Sequence[Any]):
  """``[K, ...]`` stack of K variable trees of the same model."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *entries)


def library(ratios: Sequence[float], spec: QuantSpec = EMOMC) -> QuantScheme:
  """EMOMC stage II: members pick a pre-pruned model of a library by their keep ratio.

  Args:
    ratios: the K keep ratios of the stacked entries (a member's ``keep`` selects the
      nearest one; configurations are validated to hold exactly these ratios).
    spec: the quantizers (default EMOMC's: ``symmetric_per_tensor`` weights,
      ``step = max|w| / (2^(q-1) - 1)``, FP16 activations; ``float32`` keeps them in
      float32). Integer activations would need one calibration per library entry and
      are not offered; the entries are not calibrated (``minmax`` only).

  Returns:
    The scheme; ``prepare(model, variables)`` takes the entries stacked ``[K, ...]``
    (:func:`stack_variables`). Memory: ``K * 4 * params`` bytes resident.
  """
  if spec.int_activations:
    raise ValueError("activation_format='int' is invalid with a library; allowed: 'fp16' "
                     "(EMOMC) or 'float32'")
  if spec.calibration != "minmax":
    raise ValueError(f"calibration={spec.calibration!r} is invalid with a library (its "
                     "entries are not calibrated); allowed: 'minmax'")
  weight_range = spec.resolved_weight_range
  ratios = np.asarray(ratios, np.float32)

  def one(stacked):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype),
                        stacked)

  def prepare(model, stacked, input_shape):
    if len(ratios) != len(jax.tree.leaves(stacked)[0]):
      raise ValueError(f"ratios: {len(ratios)} keep ratios for "
                       f"{len(jax.tree.leaves(stacked)[0])} stacked entries; allowed: one each")
    layers, _ = trace_quantizers(model, input_shape, one(stacked), spec.placement)
    return LibraryPrepared(variables=stacked, ratios=jnp.asarray(ratios),
                           paths=kernel_paths(layers))

  def member_pruned(prepared, config):
    index = jnp.argmin(jnp.abs(prepared.ratios - jnp.asarray(config.keep).reshape(())))
    variables = jax.tree.map(lambda v: v[index], prepared.variables)
    return variables, [get_path(variables, p) for p in prepared.paths]

  def member_quantizers(prepared, config):
    return MemberQuantizers([{"weight_range": weight_range} for _ in prepared.paths])

  return QuantScheme("library", spec, prepare, member_pruned, member_quantizers,
                     lambda prepared: one(prepared.variables), tuple(float(r) for r in ratios))


def _shapes(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


SchemeBuilder = Callable[..., QuantScheme]
"""``builder(source, spec, calibration, tables) -> QuantScheme`` for a problem's model
source (``problem.ModelSource``: ``kind``, ``variables``, ``ratios``, ...), its spec and
the calibration / tables computed for it (None where not needed)."""


def _ptq_builder(source, spec, calibration, tables):
  return ptq(calibration, spec, tables)


def _library_builder(source, spec, calibration, tables):
  return library(source.ratios, spec)


BUILTIN_SCHEMES: Mapping[str, SchemeBuilder] = {"ptq": _ptq_builder, "library": _library_builder}
"""The built-in schemes by name: ``ptq`` for a float checkpoint, ``library`` for an EMOMC
library (``Registries.schemes`` starts from these)."""
