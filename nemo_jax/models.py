"""Quantization-aware Flax (linen) model zoo.

Every conv / dense layer is a :class:`QConv` / :class:`QDense` whose weight bits,
input-activation bits and keep ratio come from a :class:`QContext` at call time, so one
compiled function serves every configuration::

    model = nemo_jax.models.get_model("resnet20", input_shape=(28, 28, 1), num_classes=10)
    logits = model.apply(variables, images, QContext.from_config(config, calibration))

Your own linen model needs no rewrite: :func:`intercept` quantizes its ``nn.Conv`` /
``nn.ConvTranspose`` / ``nn.Dense`` / ``nn.DenseGeneral`` calls from the same context::

    model = nemo_jax.models.intercept(MyCNN())       # same variables as MyCNN()
    logits = model.apply(variables, images, QContext.from_config(config, calibration))

An NNX module too (``nnx.Conv`` / ``nnx.ConvTranspose`` / ``nnx.Linear`` /
``nnx.LinearGeneral``), behind the same ``apply`` with a pure dict view of its state::

    model = nemo_jax.models.intercept(my_nnx_module)     # an NNXModel; module unedited
    logits = model.apply(model.variables, images, QContext.from_config(config, calibration))
    nemo_jax.models.nnx_update(my_nnx_module, "RUN/finetune/0/variables.msgpack")
"""

from nemo_jax._src.checkpoint import load_variables, save_variables
from nemo_jax._src.convert import convert_checkpoint, load_torch_checkpoint, torchvision_to_flax
from nemo_jax._src.intercept import HANDLED_LAYERS, Intercepted, intercept_layers, load_model_factory
from nemo_jax._src.nnx_models import HANDLED_LAYERS as HANDLED_NNX_LAYERS
from nemo_jax._src.nnx_models import NNXModel, check_intercepted, intercept, quantizable
from nemo_jax._src.nnx_models import update as nnx_update
from nemo_jax._src.layers import LayerInfo, QContext, QConv, QDense
from nemo_jax._src.models import (DEFAULT_INPUT_SHAPE, DEFAULT_MODEL, DEFAULT_NUM_CLASSES,
                                  ZOO, ModelRegistry, abstract_variables, default_spec,
                                  get_model, init_variables, list_models, trace_layers)
from nemo_jax._src.checkpoint import load_default_model, load_model
from nemo_jax._src.train import TrainConfig, float_accuracy, save_trained, train

__all__ = [
    "DEFAULT_INPUT_SHAPE", "DEFAULT_MODEL", "DEFAULT_NUM_CLASSES", "HANDLED_LAYERS",
    "HANDLED_NNX_LAYERS", "Intercepted", "NNXModel", "nnx_update", "quantizable", "LayerInfo", "QContext", "QConv", "QDense", "TrainConfig",
    "abstract_variables", "check_intercepted", "convert_checkpoint", "intercept",
    "intercept_layers", "load_model_factory",
    "default_spec", "float_accuracy", "get_model", "init_variables", "list_models",
    "load_default_model", "load_model", "load_torch_checkpoint", "load_variables",
    "ModelRegistry", "ZOO", "save_trained", "save_variables", "torchvision_to_flax", "trace_layers",
    "train",
]
