"""Where a problem's weights come from: a float checkpoint, an EMOMC library, a user model.

:func:`load_model_source` reads the model source of a problem section
(``docs/DESIGN.md``, "Problem"): a zoo (or registered) model with its float checkpoint,
the entries of an EMOMC library stacked ``[K, ...]`` for the searched keep ratios, or a
user's linen or NNX model (quantized by interception, ``intercept.py`` /
``nnx_models.py``) from a factory or from memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from nemo_jax._src import checkpoint as ckpt
from nemo_jax._src import intercept as intercept_lib
from nemo_jax._src import models as models_lib
from nemo_jax._src import nnx_models
from nemo_jax._src import quant
from nemo_jax._src import schemes as schemes_lib
from nemo_jax._src.emomc import io as library_io
from nemo_jax._src.models import ModelRegistry
from nemo_jax._src.problem.config import USER_MODEL, ProblemConfig, is_model_factory

MIN_LIBRARY_WEIGHT_BITS = 2   # EMOMC's symmetric formula needs 2^(q-1) - 1 >= 1


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where the evaluated weights come from.

  Attributes:
    kind: ``"checkpoint"`` (one float model) or ``"library"`` (pre-pruned entries).
    model: the Flax module.
    variables: what the scheme prepares: the float variables, or the library entries
      stacked ``[K, ...]``.
    input_shape, num_classes: the model's.
    dense_variables: the unpruned float variables (the FP32 reference).
    ratios: keep ratios of the stacked library entries (library only).
    library_dir, library_meta: the library and its parsed ``library.json``.
  """
  kind: str
  model: Any
  variables: Any
  input_shape: tuple[int, int, int]
  num_classes: int
  dense_variables: Any
  ratios: tuple[float, ...] = ()
  library_dir: str | None = None
  library_meta: dict | None = None


# --------------------------------------------------------------------------- sources


def check_library_config(cfg: ProblemConfig, meta: dict, library_dir: str) -> None:
  """Checks a search config against a library (before anything expensive runs).

  Raises:
    ValueError naming the field, the value and the allowed values: a keep ratio missing
    from the library, bit-widths below 2, or another model / input shape.
  """
  s = meta["settings"]
  if s["model"] != cfg.model:
    raise ValueError(f"model={cfg.model!r} does not match the library {library_dir!r}, "
                     f"which holds {s['model']!r}; allowed: {s['model']!r}")
  shape = list(cfg.resolved_input_shape)
  if list(s["input_shape"]) != shape:
    raise ValueError(f"input_shape={shape} does not match the library {library_dir!r} "
                     f"({s['input_shape']}); allowed: {s['input_shape']}")
  available = library_io.library_ratios(meta)
  for p in cfg.keep_choices:
    entry = meta["entries"].get(library_io.ratio_key(p))
    if entry is None or abs(float(entry["keep"]) - p) > schemes_lib.KEEP_MATCH_TOLERANCE:
      raise ValueError(f"keep_choices: keep ratio {p!r} is missing from the library "
                       f"{library_dir!r}; available: {list(available)}")
  for b in cfg.bit_choices:
    if b < MIN_LIBRARY_WEIGHT_BITS:
      raise ValueError(f"bit_choices: bit-width {b} is outside the EMOMC range; allowed: "
                       f"integers {MIN_LIBRARY_WEIGHT_BITS}..{quant.FLOAT_BITS} (EMOMC: 2..12)")


def user_model_source(cfg: ProblemConfig, model, variables) -> ModelSource:
  """A user's linen or NNX model (quantized by interception) and its float variables
  (an NNX model's: its own state when ``variables`` is None, as a pure dict view).

  The number of classes is read off the model's output.

  Raises:
    ValueError: a model whose output is not ``[N, classes]``, or one with parameters
      feeding products no handled layer computes (``nnx_models.check_intercepted``).
  """
  shape = cfg.resolved_input_shape
  model, variables = nnx_models.quantizable(model, variables)
  variables = jax.tree.map(jnp.asarray, variables)
  out = intercept_lib.check_runs_on(model, variables, shape)
  nnx_models.check_intercepted(model, variables, shape)
  return ModelSource("checkpoint", model, variables, shape, int(out.shape[-1]), variables)


def load_model_source(cfg: ProblemConfig, progress: bool = True, model=None,
                      variables=None, models: ModelRegistry | None = None) -> ModelSource:
  """The checkpoint, library or user model of a search config.

  A library source stacks the entries of ``keep_choices`` plus the dense model (the
  report's quantization-only baseline, p = 1): ``(K + 1) * 4 * params`` bytes resident
  (VGG-16 with the 61 ratios 0.20..0.80: ~3.6 GB). A user model comes from
  ``model`` / ``variables`` (``cfg.model == "custom"``) or the factory ``cfg.model``
  names (``intercept.load_model_factory``); a registered name is built from ``models``
  (default: the zoo). An NNX module needs no ``variables`` (its state is inside it).
  """
  if model is not None or variables is not None:
    if model is None or (variables is None and not isinstance(model, nnx.Module)):
      raise ValueError("model, variables: pass both (a flax.linen.Module and its variables) "
                       "or neither; a flax.nnx.Module alone (its own state) or with a state")
    return user_model_source(cfg, *intercept_lib.check_user_model(model, variables))
  if cfg.model == USER_MODEL:
    raise ValueError(f"model={USER_MODEL!r}: pass model= and variables= to nemo_jax.search "
                     "/ build_problem (the config names no zoo model or factory)")
  if is_model_factory(cfg.model):
    return user_model_source(cfg, *intercept_lib.load_model_factory(cfg.model))
  shape, classes = cfg.resolved_input_shape, cfg.resolved_num_classes
  if cfg.library is None:
    model, variables = ckpt.load_model(cfg.model, cfg.checkpoint, shape, classes, models,
                                       dataset=cfg.dataset)
    return ModelSource("checkpoint", model, variables, shape, classes, variables)
  meta = library_io.read_library(cfg.library)
  check_library_config(cfg, meta, cfg.library)
  model = models_lib.get_model(cfg.model, input_shape=shape, num_classes=classes,
                               registry=models)
  template = models_lib.abstract_variables(model, shape)
  template = {"params": template["params"], "batch_stats": template.get("batch_stats", {})}
  ratios = tuple(float(p) for p in cfg.keep_choices)
  if not any(abs(p - library_io.DENSE_KEEP) <= schemes_lib.KEEP_MATCH_TOLERANCE
             for p in ratios):
    ratios = ratios + (library_io.DENSE_KEEP,)
  entries = [library_io.load_entry(cfg.library, p, template, meta)
             for p in tqdm(ratios, disable=not progress, desc="load library", unit="model")]
  dense = entries[int(np.argmin([abs(p - library_io.DENSE_KEEP) for p in ratios]))]
  return ModelSource("library", model, schemes_lib.stack_variables(entries), shape, classes,
                     dense, ratios, cfg.library, meta)
