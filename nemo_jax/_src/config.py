"""The configuration pytree shared by search, costs and evaluation, and its JSON form.

``QuantConfig`` is THE contract between search and evaluation (DESIGN.md): every species
decodes its genomes to it; costs and accuracy never know where a config came from.

Shapes: one member has ``w_bits[L]``, ``a_bits[L]`` (int32) and ``keep[]`` (float32); a
population stacks them: ``w_bits[P, L]``, ``a_bits[P, L]``, ``keep[P]``. ``L`` is the
number of quantized (conv/dense) layers of the model, in execution order. A bit-width
of 32 means float.

JSON form (hand-written or from search results; omitted lists mean float, omitted
keep means 1)::

    {"model": "resnet20", "input_shape": [28, 28, 1], "num_classes": 10,
     "w_bits": [8, 4, ...], "a_bits": [8, 8, ...], "keep": 1.0}
"""

from __future__ import annotations

import json
import numbers
from typing import Any, Mapping

import flax.struct
import jax.numpy as jnp
import numpy as np

from nemo_jax._src.quant import FLOAT_BITS, MAX_BITS, MIN_BITS


@flax.struct.dataclass
class QuantConfig:
  """Per-layer weight / activation bit-widths and a global keep ratio (a pytree).

  Attributes:
    w_bits: int32 ``[..., L]`` weight bit-widths (32: float).
    a_bits: int32 ``[..., L]`` input-activation bit-widths (32: float).
    keep: float32 ``[...]`` fraction of weights kept by magnitude pruning, in (0, 1].
  """
  w_bits: Any
  a_bits: Any
  keep: Any

  @classmethod
  def uniform(cls, num_layers: int, w_bits: int = FLOAT_BITS, a_bits: int = FLOAT_BITS,
              keep: float = 1.0) -> "QuantConfig":
    """One member with the same bit-widths everywhere."""
    return cls(w_bits=jnp.full((num_layers,), w_bits, jnp.int32),
               a_bits=jnp.full((num_layers,), a_bits, jnp.int32),
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


def _check_bits(field: str, values, num_layers: int, layer_names=None) -> np.ndarray:
  arr = np.asarray(values)
  if arr.ndim != 1 or arr.shape[0] != num_layers:
    raise ValueError(f"{field}: expected a list of {num_layers} bit-widths (one per "
                     f"quantized layer), got shape {arr.shape}")
  for i, v in enumerate(arr.tolist()):
    name = f" ({layer_names[i]})" if layer_names is not None else ""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or float(v) != int(v):
      raise ValueError(f"{field}[{i}]{name}: bit-width {v!r} is not an integer; allowed: "
                       f"integers {MIN_BITS}..{MAX_BITS} ({FLOAT_BITS} = float)")
    if not MIN_BITS <= int(v) <= MAX_BITS:
      raise ValueError(f"{field}[{i}]{name}: bit-width {v} outside the allowed range "
                       f"{MIN_BITS}..{MAX_BITS} ({FLOAT_BITS} = float)")
  return arr.astype(np.int32)


def check_keep(keep, field: str = "keep") -> float:
  """Validates a keep ratio: a number in (0, 1]."""
  if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0.0 < float(keep) <= 1.0:
    raise ValueError(f"{field}: keep ratio {keep!r} outside the allowed range (0, 1]")
  return float(keep)


def validate_config(config: QuantConfig, num_layers: int, layer_names=None) -> QuantConfig:
  """Checks one member's config on the host; returns it as int32/float32 arrays.

  Raises:
    ValueError naming the field, the layer and the allowed values.
  """
  w = _check_bits("w_bits", config.w_bits, num_layers, layer_names)
  a = _check_bits("a_bits", config.a_bits, num_layers, layer_names)
  keep = config.keep
  keep = check_keep(float(keep) if hasattr(keep, "shape") else keep)  # arrays or JSON numbers
  return QuantConfig(w_bits=jnp.asarray(w), a_bits=jnp.asarray(a),
                     keep=jnp.asarray(keep, jnp.float32))


_JSON_KEYS = {"model", "input_shape", "num_classes", "w_bits", "a_bits", "keep"}


def config_from_dict(d: Mapping[str, Any], num_layers: int | None = None,
                     layer_names=None) -> tuple[dict, QuantConfig]:
  """Parses the JSON form. Returns ``(model_spec, config)``.

  ``model_spec`` holds ``model``, ``input_shape`` and ``num_classes`` (those present).
  If ``num_layers`` is None it is taken from the model spec (requires ``model``).
  """
  if not isinstance(d, Mapping):
    raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
  unknown = set(d) - _JSON_KEYS
  if unknown:
    raise ValueError(f"config: unknown key(s) {sorted(unknown)}; allowed: {sorted(_JSON_KEYS)}")
  spec = {k: d[k] for k in ("model", "input_shape", "num_classes") if k in d}
  if "input_shape" in spec:
    shp = spec["input_shape"]
    if (not isinstance(shp, (list, tuple)) or len(shp) != 3
        or not all(isinstance(s, int) and s > 0 for s in shp)):
      raise ValueError(f"input_shape: expected [H, W, C] positive integers, got {shp!r}")
    spec["input_shape"] = tuple(shp)
  if "num_classes" in spec and (not isinstance(spec["num_classes"], int)
                                or spec["num_classes"] < 1):
    raise ValueError(f"num_classes: expected a positive integer, got {spec['num_classes']!r}")
  if num_layers is None:
    if "model" not in spec:
      raise ValueError("config: 'model' is required to know the number of layers")
    from nemo_jax._src import workload as _workload  # local: avoids an import cycle
    wl = _workload.extract_workload(spec["model"], spec.get("input_shape"),
                                    spec.get("num_classes"))
    num_layers = wl.num_layers
    layer_names = layer_names or wl.layer_names
  w = d.get("w_bits", [FLOAT_BITS] * num_layers)
  a = d.get("a_bits", [FLOAT_BITS] * num_layers)
  keep = d.get("keep", 1.0)
  return spec, validate_config(QuantConfig(w_bits=w, a_bits=a, keep=keep), num_layers,
                               layer_names)


def config_to_dict(config: QuantConfig, model_spec: Mapping[str, Any] | None = None) -> dict:
  """The JSON form of one member."""
  out = dict(model_spec or {})
  if "input_shape" in out:
    out["input_shape"] = list(out["input_shape"])
  out["w_bits"] = [int(b) for b in np.asarray(config.w_bits).tolist()]
  out["a_bits"] = [int(b) for b in np.asarray(config.a_bits).tolist()]
  out["keep"] = float(np.asarray(config.keep))
  return out


def load_config(path, num_layers: int | None = None) -> tuple[dict, QuantConfig]:
  """Reads a config JSON file (see module docstring)."""
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"config file {path}: not valid JSON ({e})") from None
  except OSError as e:
    raise ValueError(f"config file {path}: cannot be read ({e.strerror})") from None
  return config_from_dict(d, num_layers)
