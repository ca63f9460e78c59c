"""Export of one configuration as real integers: a packed ``.npz`` or an ONNX QDQ model.

A member of a search (or any ``QuantConfig`` of a model, its variables and a scheme
with ``member_pruned``: ``schemes.ptq`` and ``schemes.library``) becomes

* **integer weights packed at their bit-width**: every layer's kernel as unsigned
  ``b``-bit codes, all layers in ONE big-endian bit stream (``numpy.packbits``), layer
  ``i`` at ``bit_offset[i]``; a float layer (``w_bits >= 32``) holds its float32 bit
  patterns. So the stream is ``ceil(weight_bits / 8)`` bytes and, with the float32
  biases / BatchNorm parameters, the file's payload is the project's ``model_bits``
  (``costs/formulas.py``) to the byte;
* per-channel (or per-tensor) ``scale`` / ``zero_point`` such that the kernel is
  ``(code - zero_point) * scale`` (encoding ``"offset"``), or ``(2 code - 1) * scale``
  (encoding ``"binary"``, 1-bit symmetric), times the ``mask`` where one is written
  (pruned layers; 1-bit layers with zeros); bit for bit the evaluator's fake-quantized
  kernel (``quant.weight_integers``);
* the calibrated activation ranges ``lo`` / ``hi`` and each quantizer's ``scale`` /
  ``zero_point`` at its bit-width;
* a per-layer precision JSON (a sidecar ``FILE.json``, and inside the ``.npz``).

ONNX (opset 21): the model is traced once (``jax.make_jaxpr``) with marker primitives
on every activation and weight quantizer and the jaxpr is translated op by op
(parameter-only arithmetic, e.g. BatchNorm's ``rsqrt``, is folded with JAX itself).
Weights are integer initializers (int8 / uint8 for ``b <= 8``, int32 above) behind
``DequantizeLinear`` (per-channel ``axis``); activations are ``QuantizeLinear`` ->
``Clip`` to ``[0, 2^b - 1]`` (uint8, for ``b < 8``) -> ``DequantizeLinear`` for
``b <= 8``, and ``Div, Round, Add, Clip, Sub, Mul`` in float (the fake quantizer's own
arithmetic) for ``8 < b < 32``; FP16 activations are a ``Cast`` pair. Input: NHWC
float32 ``[N, H, W, C]`` (dynamic ``N``), preprocessed as for the evaluator; output:
logits. Convolutions sit between ``Transpose`` nodes (NHWC <-> NCHW).
(``docs/DESIGN.md``, "Export".)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from nemo_jax._src import quant
from nemo_jax._src.precision import config_to_dict
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.faults import write_atomic
from nemo_jax._src.layers import ActInfo, LayerInfo, QContext, depthwise_impl
from nemo_jax._src.models import trace_quantizers
from nemo_jax._src.schemes import QuantScheme, kernel_paths
from nemo_jax._src.spec import QuantSpec

EXPORT_FORMAT = "nemo_jax.export.v1"
FORMATS = ("npz", "onnx")
ONNX_OPSET = 21
ENCODINGS = ("offset", "binary", "float32")
"""How a layer's codes become its kernel: ``(code - zero_point) * scale``,
``(2 code - 1) * scale`` (1-bit symmetric) or the float32 bit pattern itself."""


# --------------------------------------------------------------------------- integers


@dataclasses.dataclass
class ExportedLayer:
  """One quantized layer as integers (host numpy).

  Attributes:
    info: the layer's ``LayerInfo`` (name, op, shapes).
    path: its kernel's path in the variables (``("params", ..., "kernel")``).
    bits: weight bit-width (32: float).
    encoding: one of :data:`ENCODINGS`.
    codes: uint64 ``[N]`` unsigned ``bits``-bit codes, kernel in row-major order.
    shape: kernel shape (HWIO or ``[in, out]``).
    scale: float32 ``[C]`` (per channel) or ``[1]`` (per tensor); empty for float32.
    zero_point: int64, shaped as ``scale``.
    mask: bool kernel-shaped array (True = weight kept) or None.
  """
  info: LayerInfo
  path: tuple[str, ...]
  bits: int
  encoding: str
  codes: np.ndarray
  shape: tuple[int, ...]
  scale: np.ndarray
  zero_point: np.ndarray
  mask: np.ndarray | None

  def signed(self) -> np.ndarray:
    """The int64 kernel-shaped integers: the codes (``"offset"``; subtract
    ``zero_point``) or ``2 code - 1`` masked (``"binary"``)."""
    c = self.codes.astype(np.int64).reshape(self.shape)
    if self.encoding == "binary":
      q = 2 * c - 1
      return q if self.mask is None else np.where(self.mask, q, 0)
    return c

  def kernel(self) -> np.ndarray:
    """The dequantized float32 kernel (numpy only)."""
    if self.encoding == "float32":
      return self.codes.astype(np.uint32).view(np.float32).reshape(self.shape)
    scale = self.scale.astype(np.float32)
    zp = self.zero_point
    if self.encoding == "binary":
      w = self.signed().astype(np.float32) * scale
    else:
      w = (self.signed() - zp).astype(np.float32) * scale
    if self.mask is not None:
      w = np.where(self.mask, w, np.float32(0.0))
    return w.astype(np.float32)


@dataclasses.dataclass
class ExportedActivation:
  """One activation quantizer (host): bits, calibrated range and integer parameters."""
  info: ActInfo
  bits: int
  lo: float | None
  hi: float | None
  scale: float | None
  zero_point: int | None


@dataclasses.dataclass
class ExportedMember:
  """Everything a file of one configuration holds (see the module docstring).

  Attributes:
    layers: per quantized layer, execution order.
    activations: per activation quantizer.
    variables: the member's variables (numpy; kernels are the float pruned ones).
    config: the member (``w_bits[L]``, ``a_bits[La]``, scalar keep; numpy).
    spec: the scheme's quantizers.
    input_shape: ``(H, W, C)``.
  """
  layers: list[ExportedLayer]
  activations: list[ExportedActivation]
  variables: Any
  config: QuantConfig
  spec: QuantSpec
  input_shape: tuple[int, int, int]


def _codes(q, zp, bits: int, mode: str):
  """Unsigned codes, encoding, zero points in code space, mask for 1-bit zeros."""
  q = q.astype(np.int64)
  if mode.startswith("symmetric"):
    if bits == 1:
      mask = q != 0
      return (q > 0).astype(np.uint64), "binary", np.zeros_like(zp, np.int64), mask
    offset = 1 << (bits - 1)
    return ((q + offset).astype(np.uint64), "offset",
            np.full(zp.shape, offset, np.int64), None)
  return q.astype(np.uint64), "offset", zp.astype(np.int64), None


def quantize_member(model, variables, scheme: QuantScheme, config: QuantConfig,
                    input_shape, prepared=None) -> ExportedMember:
  """The integer form of one configuration (weights, scales, masks, activation ranges).

  Args:
    model: zoo model.
    variables: what ``scheme.prepare`` takes (float variables, or stacked library
      entries).
    scheme: the member's scheme (``schemes.ptq``, ``schemes.library``).
    config: one validated member (``w_bits[L]``, ``a_bits[La]``, scalar ``keep``).
    input_shape: ``(H, W, C)``.
    prepared: ``scheme.prepare(model, variables, input_shape)`` if already computed.

  Returns:
    An :class:`ExportedMember`.

  Raises:
    ValueError: a scheme that cannot be exported (no integer form, or bias correction,
      which adds per-layer output offsets the integer formats do not carry).
  """
  spec = scheme.spec
  if scheme.member_outputs is not None:
    raise ValueError(f"calibration={spec.calibration!r}: bias correction is not "
                     "exported (the per-layer output offsets have no place in the integer "
                     "formats); allowed: a calibration without bias correction (minmax, "
                     "percentile, mse)")
  input_shape = tuple(int(s) for s in input_shape)
  mode = spec.weight_quant
  if prepared is None:
    prepared = scheme.prepare(model, variables, input_shape)
  layers, acts = trace_quantizers(model, input_shape, scheme.variables_template(prepared),
                                  spec.placement)

  @jax.jit
  def integers(prepared, config):
    member_vars, kernels = scheme.member_pruned(prepared, config)
    quantizers = scheme.member_quantizers(prepared, config)
    out = [quant.weight_integers(k, config.w_bits[i], mode, **quantizers.weight_kwargs[i])
           for i, k in enumerate(kernels)]
    return member_vars, kernels, out, (quantizers.act_lo, quantizers.act_hi)

  member_vars, kernels, ints, (lo, hi) = jax.device_get(integers(prepared, config))
  w_bits = np.asarray(config.w_bits).astype(int)
  a_bits = np.asarray(config.a_bits).astype(int)
  keep = float(np.asarray(config.keep))
  paths = kernel_paths(layers)
  out_layers = []
  for i, info in enumerate(layers):
    k = np.asarray(kernels[i], np.float32)
    bits = int(w_bits[i])
    pruned = keep < 1.0
    mask = (k != 0) if pruned else None
    if bits >= quant.FLOAT_BITS:
      codes = np.ascontiguousarray(k).view(np.uint32).astype(np.uint64).reshape(-1)
      out_layers.append(ExportedLayer(info, paths[i], quant.FLOAT_BITS, "float32", codes,
                                      k.shape, np.zeros((0,), np.float32),
                                      np.zeros((0,), np.int64), mask))
      continue
    q, scale, zp = (np.asarray(a) for a in ints[i])
    codes, encoding, zp_codes, zeros = _codes(q, zp, bits, mode)
    if zeros is not None and not zeros.all():
      mask = zeros if mask is None else (mask & zeros)
    out_layers.append(ExportedLayer(
        info, paths[i], bits, encoding, codes.reshape(-1), k.shape,
        scale.reshape(-1).astype(np.float32), zp_codes.reshape(-1), mask))

  out_acts = []
  for q, info in enumerate(acts):
    bits = int(a_bits[q])
    if not spec.int_activations or lo is None:
      out_acts.append(ExportedActivation(info, bits, None, None, None, None))
      continue
    l, h = float(np.asarray(lo)[q]), float(np.asarray(hi)[q])
    scale = zp = None
    if bits < quant.FLOAT_BITS:
      s, z, _ = quant.act_params(jnp.float32(l), jnp.float32(h), bits, spec.act_quant)
      scale, zp = float(np.float32(s)), int(np.float32(z))
    out_acts.append(ExportedActivation(info, bits, l, h, scale, zp))
  config = QuantConfig(w_bits=w_bits, a_bits=a_bits, keep=np.float32(keep))
  return ExportedMember(out_layers, out_acts, jax.tree.map(np.asarray, member_vars), config,
                        spec, input_shape)


# --------------------------------------------------------------------------- packing


_PACK_CHUNK = 1 << 20


def _code_bits(codes: np.ndarray, bits: int) -> np.ndarray:
  """``[N * bits]`` uint8 0/1, most significant bit first."""
  shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
  parts = [((codes[s:s + _PACK_CHUNK, None] >> shifts) & np.uint64(1)).astype(np.uint8)
           .reshape(-1) for s in range(0, max(len(codes), 1), _PACK_CHUNK)]
  return np.concatenate(parts) if parts else np.zeros((0,), np.uint8)


def pack_codes(codes: Sequence[np.ndarray], bits: Sequence[int]):
  """One bit stream of every layer's codes at its bit-width (``numpy.packbits``).

  Args:
    codes: per layer, unsigned integer codes ``[N_l]`` (< ``2^b_l``).
    bits: per layer, the bit-width ``b_l`` (1..32).

  Returns:
    ``(packed uint8 [ceil(sum N_l b_l / 8)], bit_offsets [L + 1])``.

  Raises:
    ValueError: a code that does not fit its bit-width.
  """
  pieces, offsets = [], [0]
  for i, (c, b) in enumerate(zip(codes, bits)):
    c = np.asarray(c, np.uint64).reshape(-1)
    if c.size and int(c.max()) >> int(b):
      raise ValueError(f"codes[{i}]: value {int(c.max())} does not fit {b} bits; allowed: "
                       f"0..{(1 << int(b)) - 1}")
    pieces.append(_code_bits(c, int(b)))
    offsets.append(offsets[-1] + c.size * int(b))
  stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.uint8)
  return np.packbits(stream), np.asarray(offsets, np.int64)


def unpack_codes(packed: np.ndarray, offset: int, count: int, bits: int) -> np.ndarray:
  """``count`` codes of ``bits`` bits starting at bit ``offset`` of ``packed`` (uint64)."""
  first, last = offset // 8, -(-(offset + count * bits) // 8)
  stream = np.unpackbits(np.asarray(packed, np.uint8)[first:last])
  stream = stream[offset - 8 * first: offset - 8 * first + count * bits]
  stream = stream.reshape(count, bits).astype(np.uint64)
  weights = np.uint64(1) << np.arange(bits - 1, -1, -1, dtype=np.uint64)
  return (stream * weights).sum(axis=1, dtype=np.uint64)


# --------------------------------------------------------------------------- files


def _is_kernel_path(member: ExportedMember) -> set:
  return {tuple(l.path) for l in member.layers}


def _float_leaves(member: ExportedMember) -> dict[str, np.ndarray]:
  """Every variable that is not a quantized layer's kernel, by ``/``-joined path."""
  kernels = _is_kernel_path(member)
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(member.variables):
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    if keys not in kernels:
      out["/".join(keys)] = np.asarray(leaf, np.float32)
  return out


def member_sizes(member: ExportedMember, packed_bytes: int | None = None) -> dict:
  """Byte counts of an export (``model_bits`` as in ``costs/formulas.py``).

  Returns:
    ``weight_bits`` (sum of ``N_l b_l``), ``packed_weight_bytes`` (the bit stream),
    ``float_param_bytes`` (float32 learnable parameters besides the kernels),
    ``model_bits`` / ``model_bytes`` (``ceil(model_bits / 8)``: the two above),
    ``running_stat_bytes`` (BatchNorm running statistics, not a learnable parameter
    and not in ``model_bits``), ``metadata_bytes`` (scales, zero points, masks,
    activation parameters).
  """
  weight_bits = sum(int(np.prod(l.shape)) * l.bits for l in member.layers)
  floats = _float_leaves(member)
  params = sum(a.size for k, a in floats.items() if k.startswith("params/"))
  stats = sum(a.size for k, a in floats.items() if not k.startswith("params/"))
  meta = sum(4 * l.scale.size + 4 * l.zero_point.size
             + (-(-l.mask.size // 8) if l.mask is not None else 0) for l in member.layers)
  meta += sum(16 for a in member.activations if a.lo is not None)
  model_bits = weight_bits + quant.FLOAT_BITS * params
  return {"weight_bits": int(weight_bits),
          "packed_weight_bytes": int(packed_bytes if packed_bytes is not None
                                     else -(-weight_bits // 8)),
          "float_param_bytes": int(4 * params), "model_bits": int(model_bits),
          "model_bytes": int(-(-weight_bits // 8) + 4 * params),
          "running_stat_bytes": int(4 * stats), "metadata_bytes": int(meta)}


def precision_dict(member: ExportedMember, offsets=None, model_spec: Mapping | None = None,
                   extra: Mapping | None = None) -> dict:
  """The per-layer precision JSON of an export (also the sidecar file)."""
  if offsets is None:
    offsets = np.cumsum([0] + [int(np.prod(l.shape)) * l.bits for l in member.layers])
  layers = []
  for i, l in enumerate(member.layers):
    q = l.info.input_quantizer
    layers.append({
        "index": i, "name": l.info.name, "op": l.info.op, "kernel": "/".join(l.path),
        "shape": list(l.shape), "weights": int(np.prod(l.shape)), "w_bits": l.bits,
        "encoding": l.encoding, "bit_offset": int(offsets[i]),
        "num_bits": int(np.prod(l.shape)) * l.bits,
        "per_channel": l.encoding != "float32" and member.spec.weight_quant.endswith(
            "per_channel"),
        "masked": l.mask is not None,
        "kept": int(l.mask.sum()) if l.mask is not None else int(np.prod(l.shape)),
        "input_quantizer": int(q), "a_bits": int(member.activations[q].bits)})
  acts = [{"index": a.info.index, "name": a.info.name, "kind": a.info.kind, "bits": a.bits,
           "lo": a.lo, "hi": a.hi, "scale": a.scale, "zero_point": a.zero_point}
          for a in member.activations]
  out = {"format": EXPORT_FORMAT,
         "config": config_to_dict(member.config, model_spec),
         "weight_quant": member.spec.weight_quant,
         "weight_range": member.spec.resolved_weight_range,
         "act_quant": member.spec.act_quant, "calibration": member.spec.calibration,
         "activation_format": member.spec.activation_format,
         "placement": member.spec.placement,
         "input_shape": list(member.input_shape),
         "sizes": member_sizes(member, -(-int(offsets[-1]) // 8)),
         "layers": layers, "activations": acts}
  out.update(extra or {})
  return out


def save_npz(path: str, member: ExportedMember, model_spec: Mapping | None = None,
             extra: Mapping | None = None) -> dict:
  """Writes the packed integer form of ``member`` to ``path`` (``.npz``) and ``path.json``.

  Keys: ``weights_packed`` (uint8 bit stream), ``bit_offsets`` (int64 ``[L + 1]``),
  ``layer_{i:03d}/scale``, ``/zero_point``, ``/mask`` (packed bits, where written),
  ``float/<variable path>`` (every other variable, float32), ``act/lo``, ``act/hi``,
  ``act/scale``, ``act/zero_point``, ``act/bits`` (integer activations), and
  ``precision_json`` (the sidecar's text).

  Returns:
    The precision dict (as written to ``path.json``).
  """
  packed, offsets = pack_codes([l.codes for l in member.layers],
                               [l.bits for l in member.layers])
  info = precision_dict(member, offsets, model_spec, extra)
  arrays = {"weights_packed": packed, "bit_offsets": offsets}
  for i, l in enumerate(member.layers):
    arrays[f"layer_{i:03d}/scale"] = l.scale
    arrays[f"layer_{i:03d}/zero_point"] = l.zero_point
    if l.mask is not None:
      arrays[f"layer_{i:03d}/mask"] = np.packbits(l.mask.reshape(-1))
  for k, v in _float_leaves(member).items():
    arrays[f"float/{k}"] = v
  if any(a.lo is not None for a in member.activations):
    arrays["act/lo"] = np.asarray([a.lo for a in member.activations], np.float32)
    arrays["act/hi"] = np.asarray([a.hi for a in member.activations], np.float32)
    arrays["act/bits"] = np.asarray([a.bits for a in member.activations], np.int32)
    arrays["act/scale"] = np.asarray([np.nan if a.scale is None else a.scale
                                      for a in member.activations], np.float32)
    arrays["act/zero_point"] = np.asarray([-1 if a.zero_point is None else a.zero_point
                                           for a in member.activations], np.int64)
  text = json.dumps(info, indent=1)
  arrays["precision_json"] = np.asarray(text)
  write_atomic(path, lambda f: np.savez(f, **arrays))
  write_atomic(path + ".json", lambda f: f.write(text.encode()))
  return info


def load_npz_kernels(path: str) -> tuple[dict, list[np.ndarray]]:
  """Reads an ``.npz`` export: ``(precision dict, dequantized float32 kernels)``.

  The kernels are unpacked from the bit stream and dequantized with numpy only
  (``(code - zero_point) * scale``, masks applied): the independent reading of the
  format that the tests compare with the evaluator's fake-quantized kernels.
  """
  with np.load(path) as z:
    info = json.loads(str(z["precision_json"]))
    packed, offsets = z["weights_packed"], z["bit_offsets"]
    kernels = []
    for i, l in enumerate(info["layers"]):
      n, bits = l["weights"], l["w_bits"]
      codes = unpack_codes(packed, int(offsets[i]), n, bits)
      mask = None
      if l["masked"]:
        mask = np.unpackbits(z[f"layer_{i:03d}/mask"])[:n].astype(bool).reshape(l["shape"])
      layer = ExportedLayer(None, tuple(l["kernel"].split("/")), bits, l["encoding"], codes,
                            tuple(l["shape"]), z[f"layer_{i:03d}/scale"],
                            z[f"layer_{i:03d}/zero_point"], mask)
      kernels.append(layer.kernel())
  return info, kernels


# --------------------------------------------------------------------------- ONNX

# Identity primitives marking activation quantizer q / the kernel of layer i in a jaxpr
# (only ever inside jax.make_jaxpr, never executed).
_act_p = jex_core.Primitive("nemo_export_activation")
_act_p.def_impl(lambda x, *, index: x)
_act_p.def_abstract_eval(lambda x, *, index: x)
_weight_p = jex_core.Primitive("nemo_export_weight")
_weight_p.def_impl(lambda x, *, index: x)
_weight_p.def_abstract_eval(lambda x, *, index: x)


class _Weight:
  """A layer's kernel in the jaxpr: materialised by its consumer in its layout."""

  def __init__(self, index: int):
    self.index = index


class _OnnxGraph:
  """Translates the marked jaxpr of one member into ONNX nodes and initializers."""

  def __init__(self, member: ExportedMember):
    from onnx import TensorProto, helper, numpy_helper
    self.helper, self.numpy_helper, self.TensorProto = helper, numpy_helper, TensorProto
    self.member = member
    self.nodes: list = []
    self.initializers: list = []
    self.count = 0
    self.weights: dict = {}

  def name(self, hint: str) -> str:
    self.count += 1
    return f"{hint}_{self.count}"

  def const(self, value, hint: str = "c") -> str:
    name = self.name(hint)
    self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
    return name

  def node(self, op: str, inputs: Sequence[str], hint: str | None = None, **attrs) -> str:
    out = self.name(hint or op.lower())
    self.nodes.append(self.helper.make_node(op, list(inputs), [out], **attrs))
    return out

  def tensor(self, value, perm=None) -> str:
    """ONNX name of a value (a constant becomes an initializer), optionally permuted."""
    if isinstance(value, _Weight):
      return self.weight(value.index, perm)
    if isinstance(value, np.ndarray):
      return self.const(value if perm is None else np.transpose(value, perm))
    return value if perm is None else self.node("Transpose", [value], perm=list(perm))

  # -- quantizers ----------------------------------------------------------------------

  def weight(self, i: int, perm=None) -> str:
    """Layer ``i``'s kernel (``DequantizeLinear`` of integers), axes permuted by perm."""
    key = (i, tuple(perm) if perm is not None else None)
    if key in self.weights:
      return self.weights[key]
    layer = self.member.layers[i]
    perm = list(range(len(layer.shape))) if perm is None else list(perm)
    if layer.encoding == "float32":
      out = self.const(np.transpose(layer.kernel(), perm), f"w{i}")
    else:
      signed = layer.signed()
      if layer.encoding == "binary":
        q, zp = signed, np.zeros_like(layer.zero_point)
      elif self.member.spec.weight_quant.startswith("symmetric"):
        q, zp = signed - layer.zero_point[0], np.zeros_like(layer.zero_point)
      else:
        q, zp = signed, layer.zero_point
      symmetric = self.member.spec.weight_quant.startswith("symmetric")
      dtype = ((np.int8 if symmetric else np.uint8) if layer.bits <= 8 else np.int32)
      q = np.transpose(q, perm).astype(dtype)
      scale = layer.scale.astype(np.float32)
      axis = perm.index(len(layer.shape) - 1)
      inputs = [self.const(q, f"w{i}_q")]
      if scale.size == 1:
        inputs += [self.const(scale.reshape(()), f"w{i}_scale"),
                   self.const(zp.reshape(()).astype(dtype), f"w{i}_zp")]
        out = self.node("DequantizeLinear", inputs, f"w{i}")
      else:
        inputs += [self.const(scale, f"w{i}_scale"), self.const(zp.astype(dtype), f"w{i}_zp")]
        out = self.node("DequantizeLinear", inputs, f"w{i}", axis=axis)
    self.weights[key] = out
    return out

  def activation(self, x, q: int):
    act = self.member.activations[q]
    fmt = self.member.spec.activation_format
    if fmt == "float32" or act.bits >= quant.FLOAT_BITS:
      return x
    x = self.tensor(x)
    if fmt == "fp16":
      half = self.node("Cast", [x], f"a{q}_fp16", to=self.TensorProto.FLOAT16)
      return self.node("Cast", [half], f"a{q}", to=self.TensorProto.FLOAT)
    if act.scale is None:
      raise ValueError(f"activation quantizer {q}: no calibrated range; allowed: a scheme "
                       "with calibration for activation_format='int'")
    qmax = (1 << act.bits) - 1
    scale = np.float32(act.scale)
    if act.bits <= 8:
      zp = np.uint8(act.zero_point)
      s, z = self.const(scale, f"a{q}_scale"), self.const(zp, f"a{q}_zp")
      y = self.node("QuantizeLinear", [x, s, z], f"a{q}_q")
      if act.bits < 8:
        y = self.node("Clip", [y, self.const(np.uint8(0)), self.const(np.uint8(qmax))],
                      f"a{q}_clip")
      return self.node("DequantizeLinear", [y, s, z], f"a{q}")
    s = self.const(scale, f"a{q}_scale")
    z = self.const(np.float32(act.zero_point), f"a{q}_zp")
    y = self.node("Round", [self.node("Div", [x, s])])
    y = self.node("Clip", [self.node("Add", [y, z]), self.const(np.float32(0)),
                           self.const(np.float32(qmax))])
    return self.node("Mul", [self.node("Sub", [y, z]), s], f"a{q}")

  # -- the jaxpr -----------------------------------------------------------------------

  def run(self, jaxpr, consts: list, inputs: list):
    env: dict = dict(zip(jaxpr.constvars, consts))

    def read(v):
      if isinstance(v, jex_core.Literal):
        return np.asarray(v.val, dtype=v.aval.dtype)
      return env[v]

    for v, val in zip(jaxpr.invars, inputs):
      env[v] = val
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      outs = self.equation(eqn, ins)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def equation(self, eqn, ins):
    prim, params = eqn.primitive, eqn.params
    if prim is _weight_p:
      return [_Weight(params["index"])]
    if prim is _act_p:
      return [self.activation(ins[0], params["index"])]
    sub = params.get("call_jaxpr", params.get("jaxpr")) if prim.name != "reduce_window" \
        else None
    if sub is not None:
      consts = [np.asarray(c) for c in getattr(sub, "consts", ())]
      return self.run(getattr(sub, "jaxpr", sub), consts, list(ins))
    if all(isinstance(v, np.ndarray) for v in ins):  # parameter-only: fold with JAX
      out = prim.bind(*[jnp.asarray(v) for v in ins], **params)
      outs = out if prim.multiple_results else [out]
      return [np.asarray(o) for o in outs]
    ins = [self.weight(v.index) if isinstance(v, _Weight) and prim.name not in
           ("conv_general_dilated", "dot_general") else v for v in ins]
    handler = getattr(self, f"op_{prim.name}", None)
    if handler is None:
      raise NotImplementedError(f"ONNX export: JAX primitive {prim.name!r} is not supported")
    return [handler(eqn, *ins)]

  def _binary(op):
    def fn(self, eqn, a, b):
      return self.node(op, [self.tensor(a), self.tensor(b)])
    return fn

  op_add, op_sub, op_mul, op_div = (_binary("Add"), _binary("Sub"), _binary("Mul"),
                                    _binary("Div"))
  op_max, op_min = _binary("Max"), _binary("Min")

  def op_neg(self, eqn, x):
    return self.node("Neg", [x])

  def op_rsqrt(self, eqn, x):
    return self.node("Reciprocal", [self.node("Sqrt", [x])])

  def op_convert_element_type(self, eqn, x):
    if np.dtype(eqn.params["new_dtype"]) == np.float32:
      return x
    raise NotImplementedError(f"ONNX export: cast to {eqn.params['new_dtype']}")

  def op_reshape(self, eqn, x):
    sizes = list(eqn.params["new_sizes"])
    if sizes and eqn.invars[0].aval.shape[:1] == (1,) and sizes[0] == 1:
      sizes[0] = 0  # the (dynamic) batch dimension is copied from the input
    return self.node("Reshape", [x, self.const(np.asarray(sizes, np.int64))])

  def op_broadcast_in_dim(self, eqn, x):
    shape = list(eqn.params["shape"])
    dims = eqn.params["broadcast_dimensions"]
    in_shape = eqn.invars[0].aval.shape
    expanded = [1] * len(shape)
    for d, s in zip(dims, in_shape):
      expanded[d] = s
    if list(in_shape) != expanded:
      x = self.node("Reshape", [x, self.const(np.asarray(
          [0 if (i == 0 and e == 1 and in_shape[:1] == (1,)) else e
           for i, e in enumerate(expanded)], np.int64))])
    shape[0] = 1  # Expand broadcasts: keeps the dynamic batch
    return self.node("Expand", [x, self.const(np.asarray(shape, np.int64))])

  def op_squeeze(self, eqn, x):
    return self.node("Squeeze", [x, self.const(np.asarray(eqn.params["dimensions"],
                                                          np.int64))])

  def op_reduce_sum(self, eqn, x):
    return self.node("ReduceSum", [x, self.const(np.asarray(eqn.params["axes"], np.int64))],
                     keepdims=0)

  def op_reduce_max(self, eqn, x):
    return self.node("ReduceMax", [x, self.const(np.asarray(eqn.params["axes"], np.int64))],
                     keepdims=0)

  def op_dot_general(self, eqn, x, w):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs_rank = len(eqn.invars[0].aval.shape)
    rhs_rank = len(eqn.invars[1].aval.shape)
    if lb or rb or tuple(lc) != (lhs_rank - 1,) or tuple(rc) != (0,) or rhs_rank != 2:
      raise NotImplementedError(f"ONNX export: dot_general {eqn.params['dimension_numbers']}")
    return self.node("MatMul", [self.tensor(x), self.tensor(w)])

  def op_conv_general_dilated(self, eqn, x, w):
    p = eqn.params
    dn = p["dimension_numbers"]
    if p["batch_group_count"] != 1 or any(d != 1 for d in p["lhs_dilation"]):
      raise NotImplementedError("ONNX export: transposed / batch-grouped convolution")
    lhs, rhs, out = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
    y = self.node("Conv", [self.tensor(x, lhs), self.tensor(w, rhs)],
                  strides=list(p["window_strides"]), pads=pads,
                  dilations=list(p["rhs_dilation"]), group=int(p["feature_group_count"]))
    return self.node("Transpose", [y], perm=[int(i) for i in np.argsort(out)])

  def op_reduce_window(self, eqn, x, init):
    p = eqn.params
    inner = [e.primitive.name for e in p["jaxpr"].eqns]
    if inner != ["max"] or not (np.ndim(init) == 0 and np.isneginf(init)):
      raise NotImplementedError("ONNX export: reduce_window other than max pooling")
    return self._max_pool(p, x)

  def op_reduce_window_max(self, eqn, x):
    return self._max_pool(eqn.params, x)

  def _max_pool(self, p, x):
    win, strides, pad = p["window_dimensions"], p["window_strides"], p["padding"]
    if win[0] != 1 or win[-1] != 1 or strides[0] != 1 or strides[-1] != 1 or \
        any(d != 1 for d in p["window_dilation"]) or any(d != 1 for d in p["base_dilation"]):
      raise NotImplementedError("ONNX export: pooling over batch / channel axes or dilated")
    y = self.node("MaxPool", [self.tensor(x, (0, 3, 1, 2))], kernel_shape=list(win[1:3]),
                  strides=list(strides[1:3]),
                  pads=[pad[1][0], pad[2][0], pad[1][1], pad[2][1]])
    return self.node("Transpose", [y], perm=[0, 2, 3, 1])


def to_onnx(model, member: ExportedMember, graph_name: str = "nemo_jax"):
  """The ONNX QDQ model of an exported member (module docstring).

  Args:
    model: the zoo model the member belongs to.
    member: :func:`quantize_member`'s result.
    graph_name: the ONNX graph's name.

  Returns:
    An ``onnx.ModelProto`` (checked with ``onnx.checker``): input ``images`` NHWC float32
    ``[N, H, W, C]``, output ``logits`` ``[N, num_classes]``.
  """
  import onnx
  from onnx import TensorProto, helper

  variables = member.variables

  def fn(v, x):
    ctx = QContext(quantize_input=lambda t, q: _act_p.bind(t, index=q),
                   quantize_kernel=lambda k, i: _weight_p.bind(k, index=i),
                   placement=member.spec.placement)
    return model.apply(v, x, ctx, train=False)

  with depthwise_impl("conv"):   # ONNX Conv(group=C), not the CPU slice-and-add form
    closed = jax.make_jaxpr(fn)(variables, jax.ShapeDtypeStruct((1, *member.input_shape),
                                                                 jnp.float32))
  leaves = [np.asarray(l) for l in jax.tree_util.tree_leaves(variables)]
  g = _OnnxGraph(member)
  consts = [np.asarray(c) for c in closed.consts]
  (logits,) = g.run(closed.jaxpr, consts, leaves + ["images"])
  logits = g.tensor(logits)
  g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
  num_classes = int(closed.jaxpr.outvars[0].aval.shape[-1])
  graph = helper.make_graph(
      g.nodes, graph_name,
      [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                     ["N", *member.input_shape])],
      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
      g.initializers)
  proto = helper.make_model(graph, producer_name="nemo_jax",
                            opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
  proto.ir_version = 10
  onnx.checker.check_model(proto)
  return proto


def save_onnx(path: str, model, member: ExportedMember, model_spec: Mapping | None = None,
              extra: Mapping | None = None) -> dict:
  """Writes the ONNX model of ``member`` to ``path`` and its precision JSON to ``path.json``.

  Returns:
    The precision dict (its ``sizes`` count the packed form of :func:`save_npz`; the
    ONNX file holds int8 / int32 initializers, one byte or more per weight).
  """
  proto = to_onnx(model, member)
  _, offsets = pack_codes([l.codes for l in member.layers], [l.bits for l in member.layers])
  info = precision_dict(member, offsets, model_spec, extra)
  data = proto.SerializeToString()
  info["onnx_bytes"] = len(data)
  write_atomic(path, lambda f: f.write(data))
  write_atomic(path + ".json", lambda f: f.write(json.dumps(info, indent=1).encode()))
  return info
