"""Bring your own Flax model: quantize a plain linen model without editing it.

:func:`intercept` wraps any ``flax.linen`` module so that it takes the zoo's calling
convention ``__call__(x, ctx=None, train=False)``: inside the call, every
``nn.Conv``, ``nn.ConvTranspose``, ``nn.Dense`` and ``nn.DenseGeneral`` (and
subclasses) is intercepted with ``flax.linen.intercept_methods`` and runs in the
fake-quantized, prunable form of :class:`~nemo_jax._src.layers.QConv` /
:class:`~nemo_jax._src.layers.QDense`: it takes the next layer index from the
:class:`~nemo_jax._src.layers.QContext`, quantizes its input with
``ctx.quantize_input`` and its kernel with ``ctx.quantize_kernel`` (pruning + weight
quantization, or a scheme's precomputed kernel), reports a
:class:`~nemo_jax._src.layers.LayerInfo` to ``ctx.on_layer`` and passes its output
through ``ctx.output`` (tracing hooks). Everything downstream (calibration, schemes,
the evaluator, workload extraction, costs, the GNN graph, every species) therefore works
unchanged on the wrapped model.

How a layer is computed: the layer's own flax code runs on the substituted kernel (a
clone of the layer applied to ``{"params": {..., "kernel": quantized}}``), so padding,
dilation, masks, precision and dtype promotion are exactly flax's. ``ctx=None`` does not
intercept anything: the output is bit-identical to ``module.apply``. Parameter paths
are unchanged (the wrapper shares the module's scope), so the module's own variables
work as they are.

Counting conventions (as ``workload.py``): a conv layer's ``macs`` are
``weights * H_out * W_out``; a transposed conv's ``weights * H_in * W_in`` (every input
pixel meets the whole kernel); a dense layer on ``[N, ..., C]`` (tokens) counts
``weights * positions`` with ``positions`` the product of the non-batch, non-contracted
input axes, recorded as ``in_hw = out_hw = (positions, 1)``. 1-D convolutions are
recorded as ``(L, 1)`` feature maps; convolutions over more than two spatial axes are
rejected. Per-channel weight quantization uses the kernel's LAST axis (a
``DenseGeneral`` with several feature axes shares scales across the leading ones).

What is not intercepted stays float and costs nothing: normalisation, embeddings used
as lookups, attention's activation-activation products. A parameter that feeds a
``dot_general`` / convolution outside a handled layer (``x @ self.param(...)``,
``nn.Einsum``, ``nn.Embed.attend``) would silently stay float and be missing from the
costs; :func:`check_intercepted` finds such parameters by walking the model's jaxpr
and raises an error naming the parameter and its module type.

Under the ``"nncf"`` placement a user model gets one quantizer per tensor read by
layers (shared), but no residual-add / max-pool quantizers: those sites are marked
explicitly in zoo models (``layers.quantize_activation``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from nemo_jax._src import config_file
from nemo_jax._src.faults import check_finite
from nemo_jax._src.layers import LayerInfo, QContext

HANDLED_LAYERS = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral)
"""The flax layer types (and their subclasses) that are quantized by interception."""

HANDLED_NAMES = tuple(f"nn.{t.__name__}" for t in HANDLED_LAYERS)

TRAIN_ARGS = ("auto", "train", "deterministic", None)
"""How the wrapper passes ``train`` to the module (:class:`Intercepted`)."""

_PRODUCT_PRIMITIVES = ("dot_general", "conv_general_dilated")
# Ops through which a parameter is still "the parameter" (a reshaped / cast kernel).
_PASS_THROUGH = ("convert_element_type", "reshape", "transpose", "broadcast_in_dim",
                 "squeeze", "expand_dims", "copy", "copy_p", "slice", "dynamic_slice",
                 "rev", "reduce_precision", "real", "conj")


def _path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def _tuple(v, n: int, default: int = 1) -> tuple[int, ...]:
  if v is None:
    return (default,) * n
  if isinstance(v, int):
    return (v,) * n
  return tuple(int(s) for s in v)


def split_input(args, kwargs):
  """``(x, rest_args, kwargs)``: the layer input is the first positional or ``inputs=``."""
  if args:
    return args[0], args[1:], kwargs
  kwargs = dict(kwargs)
  if "inputs" not in kwargs:
    raise ValueError("intercepted layer called without an input; allowed: layer(x) or "
                     "layer(inputs=x)")
  return kwargs.pop("inputs"), (), kwargs


def spatial_info(module, name: str, x, y, kernel_shape, transpose: bool) -> dict:
  """LayerInfo fields of a conv / transposed conv over 1 or 2 spatial axes."""
  nd = len(kernel_shape) - 2
  if nd not in (1, 2) or x.ndim != nd + 2:
    raise ValueError(
        f"{name}: {type(module).__name__} over input {tuple(x.shape)} (kernel "
        f"{tuple(kernel_shape)}) is not supported; allowed: 1-D or 2-D convolutions on "
        "[N, (H,) W, C] inputs with one batch axis")
  pad1 = (lambda t: tuple(t) + (1,)) if nd == 1 else tuple
  in_sp, out_sp = pad1(x.shape[1:-1]), pad1(y.shape[1:-1])
  k = pad1(kernel_shape[:nd])
  stride = pad1(_tuple(module.strides, nd))
  cin, cout = int(x.shape[-1]), int(kernel_shape[-1])
  groups = 1 if transpose else int(module.feature_group_count)
  weights = int(np.prod(kernel_shape))
  positions = int(np.prod(in_sp if transpose else out_sp))
  op = "depthwise" if (groups > 1 and groups == cin) else "conv"
  return dict(op=op, in_channels=cin, out_channels=cout, groups=groups,
              kernel_size=tuple(int(s) for s in k), stride=stride,
              in_hw=tuple(int(s) for s in in_sp), out_hw=tuple(int(s) for s in out_sp),
              weights=weights, macs=weights * positions)


def _dense_info(module, name: str, x, kernel_shape) -> dict:
  """LayerInfo fields of a dense / DenseGeneral layer (positions = token axes)."""
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(f"{name}: nn.DenseGeneral with batch_dims={module.batch_dims} is not "
                       "supported; allowed: batch_dims=()")
    axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    features = module.features if isinstance(module.features, Sequence) else (module.features,)
  else:
    axis, features = (-1,), (module.features,)
  return dense_fields(name, type(module).__name__, x, kernel_shape, axis, features)


def dense_fields(name: str, kind: str, x, kernel_shape, axis: Sequence[int],
                 features: Sequence[int]) -> dict:
  """LayerInfo fields of a dense layer contracting ``x`` over ``axis`` into ``features``
  (positions = the non-batch, non-contracted axes: tokens). ``kind``: the layer's type,
  for the error."""
  axis = tuple(int(a) % x.ndim for a in axis)
  if 0 in axis or x.ndim < 2:
    raise ValueError(f"{name}: {kind} contracting input {tuple(x.shape)} "
                     f"over axes {axis} is not supported; allowed: inputs [N, ..., C] with "
                     "the batch axis 0 not contracted")
  cin = int(math.prod(x.shape[a] for a in axis))
  cout = int(math.prod(features))
  positions = int(math.prod(x.shape[d] for d in range(1, x.ndim) if d not in axis))
  weights = int(np.prod(kernel_shape))
  return dict(op="dense", in_channels=cin, out_channels=cout, groups=1, kernel_size=(1, 1),
              stride=(1, 1), in_hw=(positions, 1), out_hw=(positions, 1), weights=weights,
              macs=weights * positions)


class _Interceptor:
  """The method interceptor of one model call with one context (``intercept_layers``)."""

  def __init__(self, ctx: QContext, on_params: Callable | None = None):
    self.ctx = ctx
    self.on_params = on_params
    self.inside = False   # True while a layer runs its own clone (not intercepted again)

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if (self.inside or context.method_name != "__call__"
        or not isinstance(module, HANDLED_LAYERS)):
      return next_fun(*args, **kwargs)
    ctx = self.ctx
    name = _path(module)
    x, rest, kwargs = split_input(args, kwargs)
    if "kernel" not in module.variables.get("params", {}):
      # init: let the layer create its parameters (the float output is discarded).
      self._run(lambda: next_fun(x, *rest, **kwargs))
    params = dict(module.variables["params"])
    if self.on_params is not None:
      self.on_params(module, tuple(params))
    i = ctx.next_index()
    xq = ctx.quantize_input(x, i, f"{name}:input")
    kernel = params["kernel"]
    params["kernel"] = ctx.quantize_kernel(kernel, i)
    layer = module.clone(parent=None)
    y = self._run(lambda: layer.apply({"params": params}, xq, *rest, **kwargs))
    y = ctx.output(y, i)
    if ctx.on_layer is not None:
      transpose = isinstance(module, nn.ConvTranspose)
      if isinstance(module, (nn.Conv, nn.ConvTranspose)):
        fields = spatial_info(module, name, xq, y, kernel.shape, transpose)
      else:
        fields = _dense_info(module, name, xq, kernel.shape)
      bias = int(np.prod(params["bias"].shape)) if "bias" in params else 0
      ctx.on_layer(LayerInfo(index=i, name=name, params=fields["weights"] + bias,
                             input_quantizer=ctx.layer_inputs[i], **fields))
    return y

  def _run(self, fn):
    self.inside = True
    try:
      return fn()
    finally:
      self.inside = False


@contextlib.contextmanager
def intercept_layers(ctx: QContext, on_params: Callable | None = None) -> Iterator[None]:
  """Quantizes every handled flax layer called inside the ``with`` block with ``ctx``.

  Args:
    ctx: the configuration context (``layers.QContext``) of this call.
    on_params: optional ``(module, param_names)`` callback per intercepted layer
      (:func:`check_intercepted` uses it to know which parameters were handled).

  Yields:
    Nothing; layers called inside the block (during ``init`` / ``apply``) are
    intercepted.
  """
  with nn.intercept_methods(_Interceptor(ctx, on_params)):
    yield


def train_kwargs(module: nn.Module, train_arg, train: bool) -> dict:
  if train_arg == "auto":
    params = inspect.signature(type(module).__call__).parameters
    train_arg = ("train" if "train" in params
                 else "deterministic" if "deterministic" in params else None)
  if train_arg is None:
    return {}
  if train_arg == "deterministic":
    return {"deterministic": not train}
  return {"train": train}


class Intercepted(nn.Module):
  """A plain linen model behind the zoo's ``__call__(x, ctx=None, train=False)``.

  Build it with :func:`intercept`. The variables are the module's own (the wrapper
  shares its scope: no extra nesting level).

  Attributes:
    module: the user's linen module (unchanged).
    train_arg: how ``train`` reaches the module: ``"train"`` (``train=train``),
      ``"deterministic"`` (``deterministic=not train``), None (nothing) or ``"auto"``
      (whichever of the two the module's ``__call__`` accepts, else nothing).
  """
  module: nn.Module
  train_arg: str | None = "auto"

  def setup(self):
    nn.share_scope(self, self.module)

  @property
  def model_name(self) -> str:
    """The wrapped module's class name (reports, the workload's ``model_name``)."""
    return type(self.module).__name__

  def __call__(self, x, ctx: QContext | None = None, train: bool = False):
    """The module's output; ``ctx=None``: exactly ``module.apply`` (float)."""
    kwargs = train_kwargs(self.module, self.train_arg, train)
    if ctx is None:
      return self.module(x, **kwargs)
    with intercept_layers(ctx):
      return self.module(x, **kwargs)


def takes_context(module: nn.Module) -> bool:
  """Whether ``module.__call__`` takes a ``ctx`` (a zoo-style quantization-aware model)."""
  return "ctx" in inspect.signature(type(module).__call__).parameters


def intercept(module: nn.Module, train_arg: str | None = "auto") -> nn.Module:
  """Makes a plain linen model quantizable (module docstring); zoo-style models pass.

  Args:
    module: any ``flax.linen.Module`` taking NHWC images ``x`` (plus optionally
      ``train`` / ``deterministic``). A module whose ``__call__`` already takes ``ctx``
      (built from ``QConv`` / ``QDense``) and an :class:`Intercepted` are returned as
      they are.
    train_arg: see :class:`Intercepted`.

  Returns:
    A module with ``__call__(x, ctx=None, train=False)`` and the same variables.

  Raises:
    ValueError: ``module`` is not a linen module, or a bad ``train_arg``.
  """
  if not isinstance(module, nn.Module):
    raise ValueError(f"model: got {type(module).__name__}; allowed: a flax.linen.Module")
  if train_arg not in TRAIN_ARGS:
    raise ValueError(f"train_arg={train_arg!r} is invalid; allowed: {TRAIN_ARGS}")
  if isinstance(module, Intercepted) or takes_context(module):
    return module
  return Intercepted(module, train_arg)


# --------------------------------------------------------------------------- factories


def load_model_factory(spec: str, field: str = "model"):
  """Calls the factory ``"package.module:attr"`` / ``"file.py:attr"``.

  A factory returns ``(linen_module, variables)``, or an ``nnx.Module`` (its state is
  inside it), or ``(nnx_module, state)`` (an ``nnx.State`` or a variables mapping
  ``{"params": ..., "batch_stats": ...}`` replacing the module's own).

  Returns:
    ``(module, variables)``; for an NNX module without a state, ``(module, None)``.

  Raises:
    ValueError: an import failure, a non-callable, or a result that is none of those.
  """
  factory = config_file.resolve_object(spec, field)
  if not callable(factory):
    v_type = type(factory).__name__
    raise ValueError(f"{field}={spec!r}: is a {v_type}; allowed: a function returning "
                     "(module, variables) or an nnx.Module")
  try:
    out = factory()
  except Exception as e:  # noqa: BLE001 - an error in the user's factory is theirs
    file = spec.rsplit(":", 1)[0]
    if file.endswith(".py"):
      raise config_file.user_code_error(file, e, f"{field}={spec!r}: the factory") from None
    raise ValueError(f"{field}={spec!r}: the factory raised {type(e).__name__}: {e}") from None
  if isinstance(out, nnx.Module):
    out = (out, None)
  if not (isinstance(out, (tuple, list)) and len(out) == 2):
    raise ValueError(f"{field}={spec!r}: the factory returned {type(out).__name__}; allowed: "
                     "a pair (flax.linen.Module, variables), a flax.nnx.Module or a pair "
                     "(flax.nnx.Module, state)")
  return check_user_model(out[0], out[1], field)


def check_user_model(model, variables, field: str = "model"):
  """``(model, variables)`` checked: a linen module and a variables mapping with params,
  or an NNX module and None / an ``nnx.State`` / a variables mapping."""
  if isinstance(model, nnx.Module):
    if variables is not None and not isinstance(variables, (Mapping, nnx.State)):
      raise ValueError(f"variables: got {type(variables).__name__} for the NNX model; "
                       "allowed: None (the module's own state), an nnx.State or a mapping "
                       "{'params': ..., 'batch_stats': ...}")
    return model, variables
  if not isinstance(model, nn.Module):
    raise ValueError(f"{field}: got {type(model).__name__}; allowed: a flax.linen.Module "
                     "or a flax.nnx.Module")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError(f"variables: got {type(variables).__name__}; allowed: a mapping with a "
                     "'params' collection (what module.init returns)")
  check_finite(variables, f"{field}: variables")
  return model, dict(variables)


def check_runs_on(model: nn.Module, variables, input_shape, field: str = "model"):
  """The model's output on one ``input_shape`` image (abstract): logits ``[1, classes]``.

  Raises:
    ValueError: the model fails on that shape or does not return ``[N, classes]`` logits.
  """
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  try:
    out = jax.eval_shape(lambda v, x: model.apply(v, x, None, train=False), variables, x)
  except Exception as e:  # noqa: BLE001 - a model that cannot run on the data's shape
    text = str(e).splitlines()[0] if str(e) else ""
    raise ValueError(f"{field}: {type(e).__name__} running it on input_shape="
                     f"{tuple(input_shape)}: {text}; allowed: the input shape the model "
                     "was made for") from None
  if not hasattr(out, "shape") or len(out.shape) != 2:
    raise ValueError(f"{field}: output {getattr(out, 'shape', type(out).__name__)} on "
                     f"input_shape={tuple(input_shape)}; allowed: logits [N, classes]")
  return out


# --------------------------------------------------------------------------- check


def _sub_jaxprs(eqn) -> list:
  return list(jex_core.jaxprs_in_params(eqn.params))


def unhandled_products(jaxpr, labels: list[frozenset], found: dict) -> list[frozenset]:
  """Propagates parameter labels; records ``found[param] = primitive`` at products."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  empty = frozenset()
  env: dict[Any, frozenset] = dict(zip(jaxpr.invars, labels))

  def read(v):
    return empty if isinstance(v, jex_core.Literal) else env.get(v, empty)

  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    outs = [empty] * len(eqn.outvars)
    if name in _PRODUCT_PRIMITIVES:
      for lab in ins:
        for p in lab:
          found.setdefault(p, name)
    elif name in _PASS_THROUGH and ins:
      outs = [ins[0]] * len(eqn.outvars)
    else:
      for sub in _sub_jaxprs(eqn):
        inner = getattr(sub, "jaxpr", sub)
        n = len(inner.invars)
        if n > len(ins):
          continue
        sub_outs = unhandled_products(sub, ins[len(ins) - n:], found)
        if len(sub_outs) == len(outs):
          outs = [a | b for a, b in zip(outs, sub_outs)]
    for v, lab in zip(eqn.outvars, outs):
      env[v] = lab
  return [read(v) for v in jaxpr.outvars]


def check_intercepted(model: nn.Module, variables, input_shape) -> None:
  """Rejects a model whose parameters feed products that no handled layer computes.

  Traces ``model`` (abstractly) with the float context and finds every parameter that
  reaches a ``dot_general`` or convolution, directly or through reshapes / casts,
  without being a parameter of an intercepted ``nn.Conv`` / ``nn.ConvTranspose`` /
  ``nn.Dense`` / ``nn.DenseGeneral``. Such a product would stay float and be missing
  from every cost. Normalisation scales, biases, positional embeddings and lookups do
  not feed products and pass.

  Args:
    model: an :class:`Intercepted` model (other models are not checked).
    variables: its variables (arrays or ``ShapeDtypeStruct``).
    input_shape: ``(H, W, C)`` of one image.

  Raises:
    ValueError: naming the first such parameter, its module path and type, and how
      to wrap it.
  """
  if not isinstance(model, Intercepted):
    return
  handled: set[tuple[str, ...]] = set()
  types: dict[tuple[str, ...], str] = {}

  def on_params(module, names):
    handled.update(tuple(str(p) for p in module.path) + (n,) for n in names)

  def record_types(next_fun, args, kwargs, context):
    types.setdefault(tuple(str(p) for p in context.module.path),
                     type(context.module).__name__)
    return next_fun(*args, **kwargs)

  inner = model.module
  kwargs = train_kwargs(inner, model.train_arg, False)
  params = variables["params"]
  rest = {k: val for k, val in variables.items() if k != "params"}
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in flat]

  def run(leaves, x):
    p = jax.tree_util.tree_unflatten(treedef, leaves)
    with nn.intercept_methods(record_types), intercept_layers(QContext(), on_params):
      return inner.apply({"params": p, **rest}, x, **kwargs)

  shapes = [jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for _, leaf in flat]
  x = jax.ShapeDtypeStruct((1, *tuple(input_shape)), jnp.float32)
  closed = jax.make_jaxpr(run)(shapes, x)
  jaxpr = closed.jaxpr
  labels = [frozenset([i]) for i in range(len(paths))] + [frozenset()] * (
      len(jaxpr.invars) - len(paths))
  found: dict[int, str] = {}
  unhandled_products(jaxpr, labels, found)
  bad = [i for i in sorted(found) if paths[i] not in handled]
  if not bad:
    return
  i = bad[0]
  path = paths[i]
  owner = path[:-1]
  kind = types.get(owner, "?")
  others = [("params/" + "/".join(paths[j])) for j in bad[1:]]
  more = f" (also: {others})" if others else ""
  raise ValueError(
      f"model: parameter 'params/{'/'.join(path)}' of module '{'/'.join(owner) or '<root>'}' "
      f"(type {kind}) feeds a {found[i]} that is not a {' / '.join(HANDLED_NAMES)} call, "
      f"so it would stay float and be missing from the costs{more}; allowed: compute that "
      "product with one of those layers (e.g. replace `x @ self.param('w', ...)` by "
      "`nn.Dense(features)(x)`, an einsum by `nn.DenseGeneral`), or write the layer with "
      "nemo_jax.models.QConv / QDense and a ctx argument")
