"""The configuration pytree shared by search, costs and evaluation, and its one check.

``QuantConfig`` is THE contract between search and evaluation (``docs/DESIGN.md``): every
species decodes its genomes to it; costs and accuracy never know where a config came
from. This module is a leaf of the package (it imports only ``quant``);
the JSON form of one member is read and written next to the workload (``precision.py``).

Shapes: one member has ``w_bits[L]``, ``a_bits[La]`` (int32) and ``keep[]`` (float32); a
population stacks them: ``w_bits[P, L]``, ``a_bits[P, La]``, ``keep[P]``. ``L`` is the
number of quantized (conv / dense) layers of the model, in execution order; ``La`` the
number of activation quantizers (``La = L`` for the ``conv_inputs`` placement, more for
``nncf``). A bit-width of 32 means float.
"""

from __future__ import annotations

import numbers
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax._src.quant import FLOAT_BITS, MAX_BITS, MIN_BITS


@flax.struct.dataclass
class QuantConfig:
  """Per-layer weight / activation bit-widths and a global keep ratio (a pytree).

  Attributes:
    w_bits: int32 ``[..., L]`` weight bit-widths, one per quantized layer (32: float).
    a_bits: int32 ``[..., La]`` activation bit-widths, one per activation quantizer
      (``La = L`` for the ``conv_inputs`` placement; 32: float).
    keep: float32 ``[...]`` fraction of weights kept by magnitude pruning, in (0, 1].
  """
  w_bits: Any
  a_bits: Any
  keep: Any

  @classmethod
  def uniform(cls, num_layers: int, w_bits: int = FLOAT_BITS, a_bits: int = FLOAT_BITS,
              keep: float = 1.0, num_act_quantizers: int | None = None) -> "QuantConfig":
    """One member with the same bit-widths everywhere (``La`` defaults to ``L``)."""
    num_act = num_layers if num_act_quantizers is None else num_act_quantizers
    return cls(w_bits=jnp.full((num_layers,), w_bits, jnp.int32),
               a_bits=jnp.full((num_act,), a_bits, jnp.int32),
               keep=jnp.asarray(keep, jnp.float32))

  @property
  def num_layers(self) -> int:
    return int(np.shape(self.w_bits)[-1])

  @property
  def population_shape(self) -> tuple[int, ...]:
    return tuple(np.shape(self.w_bits)[:-1])


def stack_configs(configs) -> QuantConfig:
  """Stacks single configs into a population (leading axis P)."""
  return QuantConfig(w_bits=jnp.stack([jnp.asarray(c.w_bits, jnp.int32) for c in configs]),
                     a_bits=jnp.stack([jnp.asarray(c.a_bits, jnp.int32) for c in configs]),
                     keep=jnp.stack([jnp.asarray(c.keep, jnp.float32) for c in configs]))


def validate_configs(config: QuantConfig, num_layers: int, layer_names=None,
                     population: bool = False, allowed_keep=None,
                     allowed_bits=None, num_act_quantizers: int | None = None,
                     act_names=None) -> QuantConfig:
  """THE host-side check of configurations (one member or a population).

  Called at the entry points only (the public evaluator / costs functions, the CLI,
  precision JSON); decoded search configurations are valid by construction and never
  re-checked (``docs/DESIGN.md``, "Contracts").

  Args:
    config: ``w_bits[L]``/``a_bits[La]``/scalar ``keep`` (one member) or
      ``w_bits[P, L]``/``a_bits[P, La]``/``keep[P]`` (a scalar keep is broadcast).
    num_layers: ``L`` (weight quantizers).
    layer_names, act_names: optional names of the weight / activation quantizers for
      messages.
    population: return a population ``[P, ...]`` even for one member.
    allowed_keep: optional keep ratios the caller can evaluate (e.g. a library's).
    allowed_bits: optional ``{"w_bits": values, "a_bits": values}`` a search space
      allows (``FLOAT_BITS`` always allowed).
    num_act_quantizers: ``La``, the length of ``a_bits`` (default ``L``: the
      ``conv_inputs`` placement).

  Returns:
    The config as ``int32`` / ``float32`` jax arrays.

  Raises:
    ValueError naming the field, the layer, the value and the allowed values.
  """
  if not isinstance(config, QuantConfig):
    raise ValueError(f"configs: got {type(config).__name__}; allowed: QuantConfig")
  w = np.asarray(config.w_bits)
  a = np.asarray(config.a_bits)
  num_act = num_layers if num_act_quantizers is None else num_act_quantizers
  for field, arr, n, what in (("w_bits", w, num_layers, "quantized layer"),
                              ("a_bits", a, num_act, "activation quantizer")):
    if arr.ndim not in (1, 2) or arr.shape[-1] != n or (arr.ndim == 2 and not len(arr)):
      raise ValueError(f"{field}: expected a list of {n} bit-widths (one per {what}), "
                       f"or [P, {n}] for a population; got shape {arr.shape}")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer)
                                   or np.issubdtype(arr.dtype, np.floating)):
      bad = next((v for v in arr.reshape(-1).tolist()
                  if isinstance(v, bool) or not isinstance(v, numbers.Real)), arr.dtype)
      raise ValueError(f"{field}: bit-width {bad!r} is not an integer; allowed: integers "
                       f"{MIN_BITS}..{MAX_BITS} ({FLOAT_BITS} = float)")
    values = arr.astype(np.float64)
    non_int = ~np.isfinite(values) | (values != np.round(values))
    out = (values < MIN_BITS) | (values > MAX_BITS)
    for bad, what in ((non_int, "is not an integer"), (out, "is outside the allowed range")):
      if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        names = layer_names if field == "w_bits" else act_names
        name = f" ({names[idx[-1]]})" if names is not None else ""
        where = "[" + ", ".join(map(str, idx)) + "]"
        raise ValueError(f"{field}{where}{name}: bit-width {arr[idx].item()!r} {what}; "
                         f"allowed: integers {MIN_BITS}..{MAX_BITS} ({FLOAT_BITS} = float)")
  if w.shape[:-1] != a.shape[:-1]:
    raise ValueError(f"a_bits: population shape {a.shape[:-1]} differs from w_bits' "
                     f"{w.shape[:-1]}")
  for field, arr in (("w_bits", w), ("a_bits", a)):
    if allowed_bits is not None and field in allowed_bits:
      allowed = sorted(set(int(b) for b in allowed_bits[field]) | {FLOAT_BITS})
      bad = ~np.isin(arr, allowed)
      if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{field}[{', '.join(map(str, idx))}]: bit-width {arr[idx].item()!r} "
                         f"is invalid; allowed: {allowed} ({FLOAT_BITS} = float)")
  keep = config.keep
  if isinstance(keep, bool) or (np.ndim(keep) == 0 and not isinstance(
      np.asarray(keep).item(), numbers.Real)):
    raise ValueError(f"keep: keep ratio {keep!r} outside the allowed range (0, 1]")
  keep = np.asarray(keep, np.float64)
  lead = w.shape[:-1]
  if keep.ndim > 1 or (keep.ndim == 1 and keep.shape != lead):
    raise ValueError(f"keep: expected a scalar or shape {list(lead)}, got {list(keep.shape)}")
  bad = ~((keep > 0.0) & (keep <= 1.0))
  if bad.any():
    raise ValueError(f"keep: keep ratio {keep[bad].ravel()[0]!r} outside the allowed "
                     "range (0, 1]")
  if allowed_keep is not None:
    allowed = np.asarray(allowed_keep, np.float64)
    for p in np.ravel(keep):
      if np.min(np.abs(allowed - p)) > 1e-6:
        raise ValueError(f"keep={float(p)!r} is invalid; allowed: "
                         f"{[round(float(r), 6) for r in allowed]}")
  keep = np.broadcast_to(keep, lead)
  out = QuantConfig(w_bits=jnp.asarray(w, jnp.int32), a_bits=jnp.asarray(a, jnp.int32),
                    keep=jnp.asarray(keep, jnp.float32))
  if population and w.ndim == 1:
    out = jax.tree.map(lambda x: x[None], out)
  return out
