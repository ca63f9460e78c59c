"""The model zoo: quantization-aware Flax (linen) models by name, in a registry value.

Every model is a ``flax.linen.Module`` with ``__call__(x, ctx=None, train=False)``
taking NHWC float images and returning logits; every conv / dense is a
``QConv`` / ``QDense`` so a ``QContext`` quantizes it (``ctx=None``: float model).
The quantizer index of a layer is its execution order (see each model's docstring).

Quantized layers per model (weights quantizers = input-activation quantizers):
mobilenet_v2 53, mobilenet_v2_small 53, resnet18 21, resnet50 54, resnext101_32x8d 105, resnet20 22,
vgg16_cifar 14.

Usage::

    model = get_model("resnet20", input_shape=(28, 28, 1), num_classes=10)
    variables = init_variables(model, jax.random.key(0), (28, 28, 1))
    logits = model.apply(variables, images, ctx)
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax._src.layers import ActInfo, LayerInfo, QContext
from nemo_jax._src.models import mobilenet, resnet, vgg

DEFAULT_MODEL = "resnet20"
DEFAULT_INPUT_SHAPE = (28, 28, 1)
DEFAULT_NUM_CLASSES = 10

ModelConstructor = Callable[..., nn.Module]


class ModelEntry(NamedTuple):
  """A registered model: ``constructor(input_shape, num_classes, **kwargs) -> Module``
  and the input shape / classes it is built for when only its name is given."""
  constructor: ModelConstructor
  input_shape: tuple[int, int, int]
  num_classes: int


@dataclasses.dataclass(frozen=True)
class ModelRegistry:
  """Models by name, a value (``with_model`` returns a new registry; nothing global).

  The zoo is :data:`ZOO`; a user's model is added the same way
  (``nemo_jax.Registries().with_model(name, constructor, input_shape, num_classes)``).
  """
  entries: tuple[tuple[str, ModelEntry], ...] = ()

  def with_model(self, name: str, constructor: ModelConstructor,
                 input_shape=(224, 224, 3), num_classes: int = 1000) -> "ModelRegistry":
    """A copy with ``constructor(input_shape, num_classes, **kwargs) -> Module`` as ``name``.

    Args:
      name: the model's name in configs, the CLI and :meth:`get`.
      constructor: builds the unbound module (``__call__(x, ctx, train)``).
      input_shape, num_classes: the model's defaults, used wherever a user gives only
        the name (``nemo-jax layers resnet50``).
    """
    if not isinstance(name, str) or not name:
      raise ValueError(f"model name: expected a non-empty string, got {name!r}")
    if not callable(constructor):
      raise ValueError(f"model {name!r}: constructor {constructor!r} is not callable")
    entry = ModelEntry(constructor, check_input_shape(input_shape),
                       check_num_classes(num_classes))
    old = dict(self.entries)
    if name in old and old[name].constructor is not constructor:
      raise ValueError(f"model name {name!r} is already registered")
    return ModelRegistry(tuple({**old, name: entry}.items()))

  def __contains__(self, name) -> bool:
    return name in dict(self.entries)

  def names(self) -> list[str]:
    """The registered names, sorted."""
    return sorted(dict(self.entries))

  def entry(self, name, field: str = "model") -> ModelEntry:
    """The entry of ``name``; ValueError naming ``field`` and the allowed names."""
    found = dict(self.entries).get(name) if isinstance(name, str) else None
    if found is None:
      raise ValueError(f"{field}={name!r} is invalid; allowed: {self.names()}")
    return found

  def get(self, name: str, input_shape=(224, 224, 3), num_classes: int = 1000,
          **kwargs) -> nn.Module:
    """Builds a registered model (see :func:`get_model`)."""
    constructor = self.entry(name).constructor
    input_shape = check_input_shape(input_shape)
    num_classes = check_num_classes(num_classes)
    try:
      return constructor(input_shape, num_classes, **kwargs)
    except TypeError as e:  # an unknown keyword reaches the module's dataclass
      raise ValueError(f"model {name!r}: bad option(s) {sorted(kwargs)}: {e}") from None


def list_models(registry: ModelRegistry | None = None) -> list[str]:
  """Names accepted by :func:`get_model`, sorted."""
  return (registry or ZOO).names()


def check_model_name(name, field: str = "model", registry: ModelRegistry | None = None) -> str:
  (registry or ZOO).entry(name, field)
  return name


def default_spec(name: str, registry: ModelRegistry | None = None
                 ) -> tuple[tuple[int, int, int], int]:
  """``(input_shape, num_classes)`` a model is built for when nothing else is given."""
  entry = (registry or ZOO).entry(name)
  return entry.input_shape, entry.num_classes


def check_input_shape(input_shape) -> tuple[int, int, int]:
  """Validates ``(H, W, C)`` (positive integers); returns it as a tuple of ints."""
  ok = (isinstance(input_shape, (tuple, list)) and len(input_shape) == 3
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
                for s in input_shape))
  if not ok:
    raise ValueError(f"input_shape: expected (H, W, C) of positive integers, "
                     f"got {input_shape!r}")
  return tuple(int(s) for s in input_shape)


def check_num_classes(num_classes) -> int:
  """Validates a positive integer number of classes."""
  if (not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool)
      or num_classes < 1):
    raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
  return int(num_classes)


def get_model(name: str, input_shape=(224, 224, 3), num_classes: int = 1000,
              registry: ModelRegistry | None = None, **kwargs) -> nn.Module:
  """Builds a registered model.

  Args:
    name: one of :func:`list_models`.
    input_shape: ``(H, W, C)`` of one image (the module itself is shape-agnostic;
      the shape is validated and passed to the constructor).
    num_classes: number of logits.
    registry: where ``name`` is looked up (default: the zoo, :data:`ZOO`).
    **kwargs: model options (e.g. ``width_mult`` for mobilenet_v2, layer
      constructors ``conv=``, ``dense=``, ``norm=``).

  Returns:
    An unbound ``flax.linen.Module``.

  Raises:
    ValueError: unknown name, bad ``input_shape`` / ``num_classes`` / options.
  """
  return (registry or ZOO).get(name, input_shape, num_classes, **kwargs)


def dummy_input(input_shape, batch_size: int = 1, dtype=jnp.float32) -> jax.Array:
  """Zeros ``[batch_size, H, W, C]`` for init / tracing."""
  return jnp.zeros((batch_size, *check_input_shape(input_shape)), dtype)


def init_variables(model: nn.Module, key: jax.Array, input_shape) -> dict:
  """Initial ``{'params', 'batch_stats'}`` of ``model`` for images of ``input_shape``."""
  x = dummy_input(input_shape)
  init = jax.jit(lambda k, x: model.init(k, x, None, train=False))
  # XLA:CPU's optimising backend spends ~20 s on the ~50 random-normal initialisers of
  # even ResNet-20; this program runs once, so compile it without optimisation (~3x
  # faster end to end; same random bits).
  compiled = init.lower(key, x).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return dict(compiled(key, x))


def abstract_variables(model: nn.Module, input_shape) -> dict:
  """Shapes/dtypes (``jax.ShapeDtypeStruct``) of the variables, without allocating."""
  return dict(jax.eval_shape(lambda k, x: model.init(k, x, None, train=False),
                             jax.random.key(0), dummy_input(input_shape)))


def count_params(variables) -> int:
  """Number of trainable parameters (the ``params`` collection; works on shapes too)."""
  params = variables["params"] if "params" in variables else variables
  return int(sum(np.prod(leaf.shape, dtype=np.int64)
                 for leaf in jax.tree_util.tree_leaves(params)))


def trace_quantizers(model: nn.Module, input_shape, variables=None,
                     placement: str = "conv_inputs") -> tuple[list[LayerInfo], list[ActInfo]]:
  """The quantized layers and activation quantizers of ``model`` (abstract trace).

  Args:
    model: a model whose quantized layers call the context (``__call__(x, ctx, train)``).
    input_shape: ``(H, W, C)``.
    variables: its variables (arrays or ``ShapeDtypeStruct``; default: from ``init``).
    placement: where activation quantizers sit (``layers.PLACEMENTS``).

  Returns:
    ``(layers, activations)`` in execution / creation order.

  Raises:
    ValueError: the model has no quantized layer.
  """
  infos: list[LayerInfo] = []
  acts: list[ActInfo] = []
  if variables is None:
    variables = abstract_variables(model, input_shape)

  def run(v, x):
    ctx = QContext(on_layer=infos.append, on_activation=acts.append, placement=placement)
    return model.apply(v, x, ctx, train=False)

  jax.eval_shape(run, variables, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  if not infos:
    raise ValueError("model: has no quantized (QConv/QDense) layer; allowed: a quantizable "
                     "model")
  return infos, acts


def trace_layers(model: nn.Module, input_shape, variables=None) -> list[LayerInfo]:
  """The quantized layers of ``model`` in execution order (abstract trace, no FLOPs)."""
  return trace_quantizers(model, input_shape, variables)[0]


ZOO = (ModelRegistry()
       .with_model("mobilenet_v2", mobilenet.mobilenet_v2)
       .with_model("mobilenet_v2_small", mobilenet.mobilenet_v2_small, DEFAULT_INPUT_SHAPE,
                   DEFAULT_NUM_CLASSES)
       .with_model("resnet18", resnet.resnet18)
       .with_model("resnet50", resnet.resnet50)
       .with_model("resnext101_32x8d", resnet.resnext101_32x8d)
       .with_model("resnet20", resnet.resnet20, DEFAULT_INPUT_SHAPE, DEFAULT_NUM_CLASSES)
       .with_model("vgg16_cifar", vgg.vgg16_cifar, (32, 32, 3), 10))
"""The model zoo: the built-in models, registered as a user's are."""

__all__ = [
    "DEFAULT_INPUT_SHAPE", "DEFAULT_MODEL", "DEFAULT_NUM_CLASSES", "abstract_variables",
    "check_input_shape", "check_model_name", "check_num_classes", "count_params",
    "default_spec", "dummy_input", "get_model",
    "ModelEntry", "ModelRegistry", "ZOO", "init_variables", "list_models", "trace_layers",
    "trace_quantizers",
]
