"""The problem section of a run's configuration: model, data, quantizers, costs, library.

:class:`ProblemConfig` says WHAT is optimised (which model on which images, quantized how,
scored by which objectives under which constraints) and validates itself against the
registries it may name (models, costs, schemes). The search section
(``search/config.py``) says how the search runs, the run section (``run/config.py``) what
is reported after it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from nemo_jax._src import data as data_lib
from nemo_jax._src import quant
from nemo_jax._src import validate as v
from nemo_jax._src.costs.registry import CostRegistry
from nemo_jax._src.models import ModelRegistry
from nemo_jax._src.spec import QuantSpec

ACCURACY_OBJECTIVES = ("top1_error", "top5_error")
FITNESS_LABELS = ("true", "float")
"""What the fitness images are scored against: their labels, or the float model's top-1
prediction (label-free: ``top1_error`` is then the disagreement with the float model)."""
EVAL_STRATEGIES = ("auto", "map", "vmap", "chunked_vmap")
USER_MODEL = "custom"
"""``model`` of a search whose module is passed in memory (``search(model=...)``)."""
IN_MEMORY_DATASET = "arrays"
"""``dataset`` of a search whose data arrays are passed in memory (``search(data=...)``)."""
IN_MEMORY_SPLITS = ("train", "test")


def is_model_factory(name) -> bool:
  """Whether ``model`` names a factory (``"package.module:attr"`` / ``"file.py:attr"``)."""
  return isinstance(name, str) and ":" in name


def is_user_model(name) -> bool:
  """A model that is not in a registry: a factory or one passed in memory."""
  return name == USER_MODEL or is_model_factory(name)


@dataclasses.dataclass(frozen=True)
class ProblemConfig:
  """The problem section: what configurations are and how they are scored.

  Attributes:
    model, input_shape, num_classes: the model (input_shape / num_classes default to
      the dataset's): a registered name (the zoo or ``Registries.with_model``), a
      factory ``"package.module:attr"`` / ``"file.py:attr"`` called without arguments
      and returning ``(module, variables)`` of any linen model (quantized by
      interception, ``intercept.py``) or an NNX module (``nnx_models.py``), or
      ``"custom"`` for a module passed to ``search(model=..., variables=...)``.
    checkpoint: ``"default"`` (the shipped default model) or a path to a variables file
      (``nemo-jax convert`` / ``nemo-jax train`` output).
    dataset, data_dir: evaluation data (local files only), or ``"arrays"`` for splits
      passed to ``search(data=...)`` (used as given: already preprocessed).
    eval_split, eval_per_class: the fitness images (NEMO: 5 images per class of the
      TRAINING split).
    data_seed: the seed drawing the image sets (fitness, calibration, selection, test
      subset); None: the search section's ``seed``. Set it to compare search seeds on
      the same images (paired seeds).
    calib_per_class, calib_batches: calibration images per class of ``eval_split``
      (disjoint from the fitness images) and number of batches.
    fitness_labels: ``true`` (the images' labels) or ``float`` (the float model's top-1
      prediction: label-free fidelity, the accuracy objectives become disagreement with
      the float model; the held-out sets are still scored against their labels).
    objectives: any of ``top1_error``, ``top5_error`` and the registered costs
      (``model_ratio``, ``bops_ratio``, ``energy:X|Y``, ``size_kb:csr``, ...).
    constraints: ``{objective_or_cost_name: upper_bound}``, handled by constraint
      domination.
    bit_choices: candidate bit-widths of every quantizer (NEMO: 2..8).
    quantize_activations: search activation bits too (integer activations);
      otherwise every activation uses ``fixed_act_bits``.
    fixed_act_bits: integer activation bits when they are not searched.
    quant: the quantizers (:class:`~nemo_jax._src.spec.QuantSpec`: ``weight_quant``,
      ``weight_range``, ``act_quant``, ``activation_format``, ``placement``,
      ``calibration``); NEMO's by default.
    keep_choices: candidate global keep ratios (pruning); ``(1.0,)`` = no pruning.
    library: an EMOMC pruned-model library (``nemo-jax prune-library`` output); when
      set, every keep choice must be one of its ratios and each configuration is
      evaluated on that ratio's pruned + retrained model (``problem/sources.py``).
    scheme: the quantization scheme by name (``schemes.BUILTIN_SCHEMES`` or
      ``Registries.with_scheme``); None: ``library`` with a library, else ``ptq``.
    eval_batch_size, eval_strategy: evaluation settings (``auto``, ``map``, ``vmap``,
      ``chunked_vmap``).
    custom_costs: plugins ``{name: "module:attr"}`` or ``{name: "file.py:attr"}``: user
      cost functions imported before validation (``registries.py``).
  """
  model: str = "resnet20"
  input_shape: tuple[int, int, int] | None = None
  num_classes: int | None = None
  checkpoint: str = "default"
  dataset: str = "fashion_mnist_embedded"
  data_dir: str | None = None
  eval_split: str = "train"
  eval_per_class: int = 25
  data_seed: int | None = None
  calib_per_class: int = 10
  calib_batches: int = 4
  fitness_labels: str = "true"
  objectives: tuple[str, ...] = ("top1_error", "model_ratio", "bops_ratio")
  constraints: Mapping[str, float] = dataclasses.field(default_factory=dict)
  bit_choices: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
  quantize_activations: bool = True
  fixed_act_bits: int = 8
  quant: QuantSpec = QuantSpec()
  keep_choices: tuple[float, ...] = (1.0,)
  library: str | None = None
  scheme: str | None = None
  eval_batch_size: int = 256
  eval_strategy: str = "auto"
  custom_costs: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["quant"] = self.quant.to_dict()
    for k in ("constraints", "custom_costs"):
      d[k] = dict(d[k])
    for k in ("objectives", "bit_choices", "keep_choices", "input_shape"):
      if d[k] is not None:
        d[k] = list(d[k])
    return d

  @property
  def act_fill_bits(self) -> int:
    """The bit-width of activations that are not searched (what costs count)."""
    return {"int": self.fixed_act_bits, "fp16": 16, "float32": quant.FLOAT_BITS}[
        self.quant.activation_format]

  @property
  def scheme_name(self) -> str:
    """``scheme``, or the default for the model source (``library`` / ``ptq``)."""
    return self.scheme or ("library" if self.library is not None else "ptq")

  @property
  def resolved_input_shape(self) -> tuple[int, int, int]:
    if self.input_shape is None and self.dataset == IN_MEMORY_DATASET:
      raise ValueError("input_shape: required with dataset='arrays' (search() sets it from "
                       "the data); allowed: (H, W, C)")
    return tuple(self.input_shape or data_lib.DATASETS[self.dataset].input_shape)

  @property
  def resolved_num_classes(self) -> int | None:
    """The classes (None with ``dataset="arrays"`` and no ``num_classes``)."""
    if self.num_classes or self.dataset == IN_MEMORY_DATASET:
      return self.num_classes
    return data_lib.DATASETS[self.dataset].num_classes

  @property
  def splits(self) -> tuple[str, ...]:
    """The dataset's splits (``IN_MEMORY_SPLITS`` for in-memory data)."""
    if self.dataset == IN_MEMORY_DATASET:
      return IN_MEMORY_SPLITS
    return tuple(data_lib.DATASETS[self.dataset].splits)

  @property
  def cost_names(self) -> tuple[str, ...]:
    """Costs a run computes: ``model_ratio`` and ``bops_ratio`` always, then the rest."""
    wanted = ("model_ratio", "bops_ratio") + tuple(self.objectives) + tuple(self.constraints)
    return tuple(n for n in dict.fromkeys(wanted) if n not in ACCURACY_OBJECTIVES)

  @property
  def needs_accuracy(self) -> bool:
    names = tuple(self.objectives) + tuple(self.constraints)
    return any(n in ACCURACY_OBJECTIVES for n in names)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], costs: CostRegistry, models: ModelRegistry,
                schemes: Mapping[str, Any]) -> "ProblemConfig":
    """The section from its fields, every one checked.

    Args:
      d: the fields (missing ones take their defaults); ``quant`` is a mapping of
        :class:`QuantSpec` fields (or a QuantSpec).
      costs, models, schemes: what ``objectives`` / ``constraints``, ``model`` and
        ``scheme`` may name.

    Raises:
      ValueError naming the field, the value and what is allowed.
    """
    v.known_keys("problem config", d, (f.name for f in dataclasses.fields(cls)))
    d = dict(d)
    if "custom_costs" in d:
      value = d["custom_costs"]
      if not isinstance(value, Mapping) or not all(
          isinstance(k, str) and isinstance(x, str) for k, x in value.items()):
        v.fail("custom_costs", value, "a mapping {name: 'module:attr' or 'file.py:attr'}")
      d["custom_costs"] = dict(value)
    if "quant" in d:
      d["quant"] = QuantSpec.from_dict(d["quant"], "quant")
    model = d.get("model", cls.model)
    if not is_user_model(model) and model not in models:
      v.fail("model", model, f"a registered name {models.names()}, a factory "
             "'package.module:attr' / 'file.py:attr' returning (module, variables), or "
             f"{USER_MODEL!r} (a module passed to search(model=...))")
    v.choice("dataset", d.get("dataset", cls.dataset),
             sorted(data_lib.DATASETS) + [IN_MEMORY_DATASET])
    for k in ("objectives", "bit_choices", "keep_choices"):
      if k in d:
        d[k] = v.sequence(k, d[k])
    if d.get("input_shape") is not None:
      d["input_shape"] = v.input_shape("input_shape", d["input_shape"])
    cfg = cls(**d)
    cfg.check(costs, schemes)
    return cfg

  def check(self, costs: CostRegistry, schemes: Mapping[str, Any]) -> None:
    """Checks every field (``from_dict`` calls it)."""
    v.optional_integer("num_classes", self.num_classes, 1)
    if self.data_seed is not None:
      v.seed("data_seed", self.data_seed)
    v.choice("eval_split", self.eval_split, self.splits)
    v.choice("fitness_labels", self.fitness_labels, FITNESS_LABELS)
    for f in ("eval_per_class", "calib_per_class", "calib_batches", "eval_batch_size"):
      v.integer(f, getattr(self, f), 1)
    allowed_obj = ACCURACY_OBJECTIVES + tuple(costs)
    if len(self.objectives) < 2:
      v.fail("objectives", list(self.objectives), "at least two of " + str(allowed_obj))
    if len(set(self.objectives)) != len(self.objectives):
      v.fail("objectives", list(self.objectives), "distinct names")
    for o in self.objectives:
      v.choice("objectives", o, allowed_obj)
    if not isinstance(self.constraints, Mapping):
      v.fail("constraints", self.constraints, "a mapping {name: upper_bound}")
    for name, bound in self.constraints.items():
      v.choice("constraints", name, allowed_obj)
      v.number(f"constraints[{name!r}]", bound)
    if not self.bit_choices:
      v.fail("bit_choices", self.bit_choices, "a non-empty list of integers in 1..32")
    for b in self.bit_choices:
      v.integer("bit_choices", b, quant.MIN_BITS, quant.MAX_BITS)
    v.increasing("bit_choices", self.bit_choices, "integers")
    v.boolean("quantize_activations", self.quantize_activations)
    if self.quantize_activations and not self.quant.int_activations:
      v.fail("quantize_activations", True, f"False with activation_format="
             f"{self.quant.activation_format!r} (only integer activations have bits to "
             "search)")
    v.integer("fixed_act_bits", self.fixed_act_bits, quant.MIN_BITS, quant.MAX_BITS)
    if not self.keep_choices:
      v.fail("keep_choices", self.keep_choices, "a non-empty list of numbers in (0, 1]")
    for p in self.keep_choices:
      v.keep_ratio("keep_choices", p)
    v.increasing("keep_choices", self.keep_choices, "numbers")
    v.choice("eval_strategy", self.eval_strategy, EVAL_STRATEGIES)
    v.nonempty_string("checkpoint", self.checkpoint, "'default' or a variables file path")
    if is_user_model(self.model) and self.checkpoint != "default":
      v.fail("checkpoint", self.checkpoint, f"'default' with model={self.model!r} (the "
             "variables come from the factory / search(variables=...))")
    if is_user_model(self.model) and self.library is not None:
      v.fail("library", self.library, f"None with model={self.model!r} (EMOMC libraries are "
             "built for zoo models)")
    if self.scheme is not None:
      v.choice("scheme", self.scheme, tuple(schemes))
    if self.library is not None:
      v.nonempty_string("library", self.library,
                        "None or a library directory (`nemo-jax prune-library`)")
      if self.quant.int_activations:
        v.fail("activation_format", self.quant.activation_format,
               "'fp16' (EMOMC) or 'float32' with a library")
      if self.quant.calibration != "minmax":
        v.fail("calibration", self.quant.calibration, "'minmax' with a library (its entries "
               "are not calibrated)")
