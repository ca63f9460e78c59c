"""The JSON form of one configuration (a precision config), read against a workload.

Hand-written or from search results (``export`` writes one per exported member);
omitted lists mean float, omitted keep means 1::

    {"model": "resnet20", "input_shape": [28, 28, 1], "num_classes": 10,
     "placement": "conv_inputs", "w_bits": [8, 4, ...], "a_bits": [8, 8, ...], "keep": 1.0}

``len(w_bits)`` is the workload's number of quantized layers, ``len(a_bits)`` its
number of activation quantizers (``workload.py``).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from nemo_jax._src import validate
from nemo_jax._src import workload as workload_lib
from nemo_jax._src.qconfig import QuantConfig, validate_configs
from nemo_jax._src.quant import FLOAT_BITS
from nemo_jax._src.spec import PLACEMENTS

_JSON_KEYS = {"model", "input_shape", "num_classes", "placement", "w_bits", "a_bits", "keep"}


def config_from_dict(d: Mapping[str, Any], workload=None) -> tuple[dict, QuantConfig]:
  """Parses the JSON form. Returns ``(model_spec, config)``.

  ``model_spec`` holds ``model``, ``input_shape``, ``num_classes`` and ``placement``
  (those present). Without ``workload`` it is extracted from the model spec (requires
  ``model``); ``len(w_bits)`` must be its number of layers and ``len(a_bits)`` its number
  of activation quantizers.
  """
  if not isinstance(d, Mapping):
    raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
  validate.known_keys("config", d, _JSON_KEYS)
  spec = {k: d[k] for k in ("model", "input_shape", "num_classes", "placement") if k in d}
  if "input_shape" in spec:
    spec["input_shape"] = validate.input_shape("input_shape", spec["input_shape"])
  if "num_classes" in spec:
    spec["num_classes"] = validate.integer("num_classes", spec["num_classes"], 1)
  if "placement" in spec:
    validate.choice("placement", spec["placement"], PLACEMENTS)
  if workload is None:
    if "model" not in spec:
      raise ValueError("config: 'model' is required to know the number of layers")
    workload = workload_lib.extract_workload(spec["model"], spec.get("input_shape"),
                                             spec.get("num_classes"),
                                             spec.get("placement", "conv_inputs"))
  elif spec.get("placement", workload.placement) != workload.placement:
    raise ValueError(f"placement={spec['placement']!r} is invalid for this workload; "
                     f"allowed: {workload.placement!r}")
  w = d.get("w_bits", [FLOAT_BITS] * workload.num_layers)
  a = d.get("a_bits", [FLOAT_BITS] * workload.num_act_quantizers)
  keep = d.get("keep", 1.0)
  return spec, validate_configs(QuantConfig(w_bits=w, a_bits=a, keep=keep), workload.num_layers,
                                workload.layer_names,
                                num_act_quantizers=workload.num_act_quantizers,
                                act_names=workload.act_names)


def config_to_dict(config: QuantConfig, model_spec: Mapping[str, Any] | None = None) -> dict:
  """The JSON form of one member."""
  out = dict(model_spec or {})
  if "input_shape" in out:
    out["input_shape"] = list(out["input_shape"])
  out["w_bits"] = [int(b) for b in np.asarray(config.w_bits).tolist()]
  out["a_bits"] = [int(b) for b in np.asarray(config.a_bits).tolist()]
  out["keep"] = float(np.asarray(config.keep))
  return out


def load_config(path, workload=None) -> tuple[dict, QuantConfig]:
  """Reads a precision config JSON file (see module docstring)."""
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"config file {path}: not valid JSON ({e})") from None
  except OSError as e:
    raise ValueError(f"config file {path}: cannot be read ({e.strerror})") from None
  return config_from_dict(d, workload)
