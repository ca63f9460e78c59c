"""The configuration pytree shared by search, costs and evaluation, and its JSON form.

``QuantConfig`` is THE contract between search and evaluation (``docs/DESIGN.md``): every species
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
import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax._src import validate
from nemo_jax._src import workload as workload_lib
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


def validate_configs(config: QuantConfig, num_layers: int, layer_names=None,
                     population: bool = False, allowed_keep=None,
                     allowed_bits=None) -> QuantConfig:
  """THE host-side check of configurations (one member or a population).

  Called at the entry points only (the public evaluator / costs functions, the CLI,
  precision JSON); decoded search configurations are valid by construction and never
  re-checked (``docs/DESIGN.md``, "Contracts").

  Args:
    config: ``w_bits[L]``/``a_bits[L]``/scalar ``keep`` (one member) or
      ``w_bits[P, L]``/``a_bits[P, L]``/``keep[P]`` (a scalar keep is broadcast).
    num_layers: ``L``.
    layer_names: optional names for messages.
    population: return a population ``[P, ...]`` even for one member.
    allowed_keep: optional keep ratios the caller can evaluate (e.g. a library's).
    allowed_bits: optional ``{"w_bits": values, "a_bits": values}`` a search space
      allows (``FLOAT_BITS`` always allowed).

  Returns:
    The config as ``int32`` / ``float32`` jax arrays.

  Raises:
    ValueError naming the field, the layer, the value and the allowed values.
  """
  if not isinstance(config, QuantConfig):
    raise ValueError(f"configs: got {type(config).__name__}; allowed: QuantConfig")
  w = np.asarray(config.w_bits)
  a = np.asarray(config.a_bits)
  for field, arr in (("w_bits", w), ("a_bits", a)):
    if arr.ndim not in (1, 2) or arr.shape[-1] != num_layers or (arr.ndim == 2 and not len(arr)):
      raise ValueError(f"{field}: expected a list of {num_layers} bit-widths (one per "
                       f"quantized layer), or [P, {num_layers}] for a population; got shape "
                       f"{arr.shape}")
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
        name = f" ({layer_names[idx[-1]]})" if layer_names is not None else ""
        where = "[" + ", ".join(map(str, idx)) + "]"
        raise ValueError(f"{field}{where}{name}: bit-width {arr[idx].item()!r} {what}; "
                         f"allowed: integers {MIN_BITS}..{MAX_BITS} ({FLOAT_BITS} = float)")
  if w.shape != a.shape:
    raise ValueError(f"a_bits: shape {a.shape} differs from w_bits shape {w.shape}")
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


_JSON_KEYS = {"model", "input_shape", "num_classes", "w_bits", "a_bits", "keep"}


def config_from_dict(d: Mapping[str, Any], num_layers: int | None = None,
                     layer_names=None) -> tuple[dict, QuantConfig]:
  """Parses the JSON form. Returns ``(model_spec, config)``.

  ``model_spec`` holds ``model``, ``input_shape`` and ``num_classes`` (those present).
  If ``num_layers`` is None it is taken from the model spec (requires ``model``).
  """
  if not isinstance(d, Mapping):
    raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
  validate.known_keys("config", d, _JSON_KEYS)
  spec = {k: d[k] for k in ("model", "input_shape", "num_classes") if k in d}
  if "input_shape" in spec:
    spec["input_shape"] = validate.input_shape("input_shape", spec["input_shape"])
  if "num_classes" in spec:
    spec["num_classes"] = validate.integer("num_classes", spec["num_classes"], 1)
  if num_layers is None:
    if "model" not in spec:
      raise ValueError("config: 'model' is required to know the number of layers")
    wl = workload_lib.extract_workload(spec["model"], spec.get("input_shape"),
                                       spec.get("num_classes"))
    num_layers = wl.num_layers
    layer_names = layer_names or wl.layer_names
  w = d.get("w_bits", [FLOAT_BITS] * num_layers)
  a = d.get("a_bits", [FLOAT_BITS] * num_layers)
  keep = d.get("keep", 1.0)
  return spec, validate_configs(QuantConfig(w_bits=w, a_bits=a, keep=keep), num_layers,
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
