"""Bring your own Flax NNX model: quantize an unedited ``flax.nnx`` module.

:class:`NNXModel` puts an ``nnx.Module`` behind the calling convention of the rest of
the package (the zoo's linen one): ``apply(variables, x, ctx=None, train=False)`` with
``variables`` a pure nested-dict view of the module's state,

* ``"params"``: every ``nnx.Param`` (and subclass) by attribute path, e.g.
  ``{"layer1_0": {"conv1": {"kernel": ...}}}`` (list / dict items by their index or key
  as a string: ``{"blocks": {"0": ...}}``);
* ``"batch_stats"``: every ``nnx.BatchStat`` (BatchNorm's running mean / var);

so calibration, the schemes (``schemes.kernel_paths``), the evaluator, workload
extraction, costs, the GNN graph, every species, export and fine-tuning work unchanged
on it. The user's module is never edited: every call ``nnx.merge``-s a fresh copy of its
graph (``nnx.split`` once, at construction) with the given variables; the other state
(RNG streams, custom ``nnx.Variable`` types) is kept as it was at construction.

How a layer is quantized: in the copy, every ``nnx.Conv``, ``nnx.ConvTranspose``,
``nnx.Linear`` and ``nnx.LinearGeneral`` (and subclasses) is routed (its class swapped
for a subclass whose ``__call__`` calls the hooks, only during that call): it takes the
next layer index from the :class:`~nemo_jax._src.layers.QContext`, quantizes its input
with ``ctx.quantize_input``, its kernel with ``ctx.quantize_kernel`` (the copy's
``kernel`` variable holds the substituted kernel while the layer's OWN ``__call__``
runs, so padding, dilation, masks, precision and dtype promotion are flax's), passes
its output through ``ctx.output`` and reports a
:class:`~nemo_jax._src.layers.LayerInfo` (named by the layer's attribute path joined
with ``/``) to ``ctx.on_layer``. ``ctx=None`` routes nothing: the output is
bit-identical to calling the module in inference mode. Bits and keep ratios stay traced
arrays: one compile serves every configuration.

Modes: ``train=False`` calls the copy in inference mode (``module.eval()``: every
``deterministic`` attribute True, every ``use_running_average`` True) and passes
``train=False`` / ``deterministic=True`` to the module's ``__call__`` when it takes
such an argument (``train_arg``, as for linen). ``train=True`` (fine-tuning) runs
BatchNorm with batch statistics (``use_running_average=False``; the updated statistics
come back with ``mutable=["batch_stats"]``) but keeps dropout off (``deterministic``
True: the copy's RNG streams are constants, so dropout masks would repeat).

Counting conventions and what is not quantized are the linen interception's
(``intercept.py``): a parameter that reaches a ``dot_general`` / convolution outside a
handled layer (``x @ self.w[...]``, ``nnx.Einsum``, ``nnx.Embed.attend``, LoRA's extra
matrices) is an error at :func:`check_intercepted` naming its attribute path, its type
and how to make it searchable. Not supported: ``ConvTranspose(transpose_kernel=True)``,
``LinearGeneral(batch_axis=...)``, convolutions over three spatial axes, layers inside
``nnx.scan`` / ``nnx.vmap`` (data-flow extraction), and a model that IS a single
handled layer (wrap it in a module).

Writing state back: :meth:`NNXModel.merge` returns a new NNX module holding given
variables (e.g. fine-tuned ones) and :func:`update` writes them into an existing module
in place (``nnx.update``), from a variables mapping or a ``variables.msgpack`` file
(``finetune_members`` writes one per member).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Mapping

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemo_jax._src import intercept as intercept_lib
from nemo_jax._src.layers import LayerInfo, QContext

HANDLED_LAYERS = (nnx.Conv, nnx.ConvTranspose, nnx.Linear, nnx.LinearGeneral)
"""The NNX layer types (and their subclasses) that are quantized."""

HANDLED_NAMES = tuple(f"nnx.{t.__name__}" for t in HANDLED_LAYERS)

COLLECTIONS = ("params", "batch_stats")
"""The variables' collections and the ``nnx.Variable`` types they hold."""
_FILTERS = (nnx.Param, nnx.BatchStat)

_LOCAL = threading.local()      # .router: the routing of this thread's current call
_ROUTED: dict[type, type] = {}  # handled class -> its routed subclass


def _keys(path) -> tuple[str, ...]:
  return tuple(str(k) for k in path)


def attribute_path(path) -> str:
  """``("blocks", 0, "w")`` -> ``"model.blocks[0].w"`` (how the attribute is reached)."""
  return "model" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path)


def _get(tree, keys: tuple[str, ...], where: str):
  node = tree
  for k in keys:
    if not isinstance(node, Mapping) or k not in node:
      raise ValueError(f"variables: {where}/{'/'.join(keys)} is missing; allowed: the "
                       "NNX model's own state (NNXModel.variables)")
    node = node[k]
  return node


def _set(tree: dict, keys, value) -> None:
  node = tree
  for k in keys[:-1]:
    node = node.setdefault(k, {})
  node[keys[-1]] = value


# --------------------------------------------------------------------------- routing


class _Router:
  """The hooks of one routed model call: the context and the routed layers by id."""

  def __init__(self, ctx: QContext, names: dict[int, tuple[str, tuple]], on_params=None):
    self.ctx = ctx
    self.names = names
    self.on_params = on_params


def _routed_class(cls: type) -> type:
  """The subclass of a handled class whose ``__call__`` runs the context's hooks."""
  sub = _ROUTED.get(cls)
  if sub is None:
    call = cls.__call__

    def __call__(self, *args, **kwargs):
      router = getattr(_LOCAL, "router", None)
      entry = None if router is None else router.names.get(id(self))
      if entry is None:
        return call(self, *args, **kwargs)
      return _quantized_call(call, self, router, entry, args, kwargs)

    sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__})
    _ROUTED[cls] = sub
  return sub


def _check_layer(layer, name: str) -> None:
  if isinstance(layer, nnx.ConvTranspose) and layer.transpose_kernel:
    raise ValueError(f"{name}: nnx.ConvTranspose with transpose_kernel=True is not "
                     "supported (its kernel's last axis is the input); allowed: "
                     "transpose_kernel=False")
  if isinstance(layer, nnx.LinearGeneral) and layer.batch_axis:
    raise ValueError(f"{name}: nnx.LinearGeneral with batch_axis={dict(layer.batch_axis)} "
                     "is not supported; allowed: batch_axis={}")


def _layer_fields(layer, name: str, x, y, kernel_shape) -> dict:
  if isinstance(layer, (nnx.Conv, nnx.ConvTranspose)):
    return intercept_lib.spatial_info(layer, name, x, y, kernel_shape,
                                      isinstance(layer, nnx.ConvTranspose))
  if isinstance(layer, nnx.LinearGeneral):
    return intercept_lib.dense_fields(name, "nnx.LinearGeneral", x, kernel_shape,
                                      layer.axis, layer.out_features)
  return intercept_lib.dense_fields(name, type(layer).__name__, x, kernel_shape, (-1,),
                                    (layer.out_features,))


def _quantized_call(call, layer, router: _Router, entry, args, kwargs):
  """One handled layer's call with the context's hooks (module docstring)."""
  ctx = router.ctx
  name, keys = entry
  x, rest, kwargs = intercept_lib.split_input(args, kwargs)
  if router.on_params is not None:
    router.on_params(keys)
  var = layer.kernel
  kernel = var.get_value()
  i = ctx.next_index()
  xq = ctx.quantize_input(x, i, f"{name}:input")
  var.set_value(ctx.quantize_kernel(kernel, i))
  try:
    y = call(layer, xq, *rest, **kwargs)
  finally:
    var.set_value(kernel)
  y = ctx.output(y, i)
  if ctx.on_layer is not None:
    fields = _layer_fields(layer, name, xq, y, tuple(kernel.shape))
    bias = 0 if layer.bias is None else int(np.prod(np.shape(layer.bias.get_value())))
    ctx.on_layer(LayerInfo(index=i, name=name, params=fields["weights"] + bias,
                           input_quantizer=ctx.layer_inputs[i], **fields))
  return y


@contextlib.contextmanager
def _routing(module: nnx.Module, ctx: QContext, on_params=None) -> Iterator[None]:
  """Routes every handled layer of ``module`` (a private copy) through ``ctx``."""
  names = {}
  for path, sub in nnx.iter_modules(module):
    if isinstance(sub, HANDLED_LAYERS):
      name = "/".join(_keys(path))
      if not path:
        raise ValueError(f"model: is itself a {type(sub).__name__}; allowed: a module "
                         "holding its layers as attributes (wrap the layer in an nnx.Module)")
      _check_layer(sub, name)
      object.__setattr__(sub, "__class__", _routed_class(type(sub)))
      names[id(sub)] = (name, _keys(path))
  previous = getattr(_LOCAL, "router", None)
  _LOCAL.router = _Router(ctx, names, on_params)
  try:
    yield
  finally:
    _LOCAL.router = previous


def _set_mode(module: nnx.Module, train: bool) -> None:
  if train:   # BatchNorm on batch statistics, dropout off (module docstring)
    module.set_attributes(use_running_average=False, deterministic=True,
                          raise_if_not_found=False)
  else:
    module.eval()


# --------------------------------------------------------------------------- adapter


class NNXModel:
  """An ``nnx.Module`` behind ``apply(variables, x, ctx=None, train=False)``.

  Build it with :func:`intercept` (or directly). ``variables`` is the module's state at
  construction as a pure dict (module docstring); the module itself is not edited.

  Attributes:
    variables: ``{"params": ..., "batch_stats": ...}`` of the module (a snapshot).
    graphdef: the module's ``nnx.GraphDef``.
    module_type: the module's class.
    train_arg: how ``train`` reaches the module's ``__call__``: ``"train"``,
      ``"deterministic"``, None or ``"auto"`` (whichever it takes; ``intercept.py``).
  """

  def __init__(self, module: nnx.Module, train_arg: str | None = "auto"):
    if not isinstance(module, nnx.Module):
      raise ValueError(f"model: got {type(module).__name__}; allowed: a flax.nnx.Module")
    if train_arg not in intercept_lib.TRAIN_ARGS:
      raise ValueError(f"train_arg={train_arg!r} is invalid; allowed: "
                       f"{intercept_lib.TRAIN_ARGS}")
    self.graphdef, *states, self._rest = nnx.split(module, *_FILTERS, ...)
    self.module_type = type(module)
    self.train_arg = train_arg
    self._paths: dict[str, list[tuple[tuple, tuple[str, ...]]]] = {}
    self.variables: dict[str, dict] = {}
    self.variable_types: dict[tuple[str, ...], str] = {}
    """``("params", *keys)`` -> the ``nnx.Variable`` type name (errors)."""
    for coll, state in zip(COLLECTIONS, states):
      paths, view = [], {}
      for path, var in nnx.to_flat_state(state):
        keys = _keys(path)
        paths.append((tuple(path), keys))
        _set(view, keys, var.get_value())
        self.variable_types[(coll, *keys)] = type(var).__name__
      if len({k for _, k in paths}) != len(paths):
        raise ValueError(f"model: two {coll} paths differ only by an int / str key "
                         f"({[k for _, k in paths]}); allowed: distinct attribute names")
      self._paths[coll] = paths
      self.variables[coll] = view
    self.module_types = {_keys(path): type(m).__name__ for path, m in nnx.iter_modules(module)}
    """Attribute path (string keys) -> the module's class name (errors)."""

  @property
  def model_name(self) -> str:
    """The module's class name (reports, the workload's ``model_name``)."""
    return self.module_type.__name__

  def __repr__(self) -> str:
    return f"NNXModel({self.model_name})"

  def _states(self, variables) -> list[dict]:
    if not isinstance(variables, Mapping):
      raise ValueError(f"variables: got {type(variables).__name__}; allowed: a mapping "
                       "{'params': ..., 'batch_stats': ...}")
    states = []
    for coll in COLLECTIONS:
      nested: dict = {}
      paths = self._paths[coll]
      if paths:
        tree = variables.get(coll)
        if tree is None:
          raise ValueError(f"variables: the collection {coll!r} is missing; allowed: the "
                           "NNX model's own collections (NNXModel.variables)")
        for path, keys in paths:
          _set(nested, path, _get(tree, keys, coll))
      states.append(nested)
    return states

  def merge(self, variables=None) -> nnx.Module:
    """A new NNX module (a copy of the graph) holding ``variables`` (default: its own):
    the "write back" of e.g. fine-tuned variables into a module of the user's type."""
    states = self._states(self.variables if variables is None else variables)
    return nnx.merge(self.graphdef, *states, self._rest, copy=True)

  def state(self, variables) -> dict:
    """``variables`` as one nested dict by the module's own paths (list items by int),
    what ``nnx.update(module, ...)`` takes."""
    out: dict = {}
    for state in self._states(variables):
      for path, leaf in _flat_paths(state):
        _set(out, path, leaf)
    return out

  def view(self, module: nnx.Module, collection: str) -> dict:
    """The ``collection`` of ``module`` (a merged copy) as a variables view."""
    filt = _FILTERS[COLLECTIONS.index(collection)]
    flat = dict(nnx.to_flat_state(nnx.state(module, filt)))
    out: dict = {}
    for path, keys in self._paths[collection]:
      _set(out, keys, flat[path].get_value())
    return out

  def apply(self, variables, x, ctx: QContext | None = None, train: bool = False, *,
            mutable=False, _on_params=None):
    """The module's output on ``x`` with ``variables`` (module docstring).

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` (:attr:`variables`' structure).
      x: the input.
      ctx: the quantization context (None: the float module, nothing routed).
      train: inference mode (False) or fine-tuning mode (BatchNorm on batch statistics).
      mutable: False, True or a list of collections: also return
        ``{collection: updated view}`` (linen's ``apply(..., mutable=[...])``).

    Returns:
      The output, or ``(output, updated collections)`` when ``mutable``.
    """
    module = self.merge(variables)
    _set_mode(module, train)
    kwargs = intercept_lib.train_kwargs(module, self.train_arg, train)
    if ctx is None:
      y = module(x, **kwargs)
    else:
      with _routing(module, ctx, _on_params):
        y = module(x, **kwargs)
    if not mutable:
      return y
    names = COLLECTIONS if mutable is True else tuple(mutable)
    for c in names:
      if c not in COLLECTIONS:
        raise ValueError(f"mutable: {c!r} is invalid; allowed: {list(COLLECTIONS)}")
    return y, {c: self.view(module, c) for c in names}

  def init(self, rngs, x, ctx: QContext | None = None, train: bool = False, **kwargs):
    """Runs :meth:`apply` with the module's own variables (so a context's tracing hooks
    see every layer) and returns those variables: linen's ``init`` for an NNX module,
    whose state already exists (``rngs`` is not used)."""
    del rngs
    self.apply(self.variables, x, ctx, train, **kwargs)
    return {c: jax.tree.map(lambda a: a, v) for c, v in self.variables.items()}

  def variables_from(self, given) -> dict:
    """Variables of this model from an ``nnx.State`` (of the module or its Param /
    BatchStat part) or a mapping in :attr:`variables`' structure, checked leaf by leaf.

    Raises:
      ValueError: naming every missing, unexpected or mis-shaped entry.
    """
    if isinstance(given, nnx.State):
      module = self.merge()
      nnx.update(module, given)
      return {c: self.view(module, c) for c in COLLECTIONS}
    if not isinstance(given, Mapping):
      raise ValueError(f"variables: got {type(given).__name__}; allowed: an nnx.State or a "
                       "mapping {'params': ..., 'batch_stats': ...}")
    want = {(c, *keys): leaf for c in COLLECTIONS for keys, leaf in
            _flat(self.variables.get(c, {}))}
    have = {(c, *keys): leaf for c in given for keys, leaf in _flat(given[c])}
    missing = ["/".join(p) for p in want if p not in have]
    unexpected = ["/".join(p) for p in have if p not in want]
    shapes = [f"{'/'.join(p)}: given {tuple(np.shape(have[p]))}, model "
              f"{tuple(np.shape(w))}" for p, w in want.items()
              if p in have and tuple(np.shape(have[p])) != tuple(np.shape(w))]
    if missing or unexpected or shapes:
      parts = [f"{label}: {items}" for label, items in (
          ("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
               if items]
      raise ValueError("variables do not match the NNX model: " + "; ".join(parts))
    out = {c: {} for c in COLLECTIONS}
    for p, w in want.items():
      _set(out[p[0]], p[1:], jnp.asarray(have[p], getattr(w, "dtype", None)))
    return out


def _flat_paths(tree, prefix=()):
  if not isinstance(tree, Mapping):
    return [(prefix, tree)]
  return [item for k, v in tree.items() for item in _flat_paths(v, prefix + (k,))]


def _flat(tree, prefix=()):
  if not isinstance(tree, Mapping):
    return [(prefix, tree)]
  return [item for k, v in tree.items() for item in _flat(v, prefix + (str(k),))]


# --------------------------------------------------------------------------- entry points


def intercept(module, train_arg: str | None = "auto"):
  """Makes a plain linen or NNX model quantizable (this module's / ``intercept.py``'s
  docstring); zoo-style models, :class:`NNXModel` and ``Intercepted`` pass unchanged.

  Args:
    module: a ``flax.linen.Module`` (returns ``intercept.intercept(module)``) or a
      ``flax.nnx.Module`` (returns :class:`NNXModel`).
    train_arg: how ``train`` reaches the module (``intercept.Intercepted``).

  Raises:
    ValueError: neither a linen nor an NNX module, or a bad ``train_arg``.
  """
  if isinstance(module, NNXModel):
    return module
  if isinstance(module, nnx.Module):
    return NNXModel(module, train_arg)
  if not isinstance(module, nn.Module):
    raise ValueError(f"model: got {type(module).__name__}; allowed: a flax.linen.Module or "
                     "a flax.nnx.Module")
  return intercept_lib.intercept(module, train_arg)


def quantizable(model, variables=None, train_arg: str | None = "auto"):
  """``(model, variables)`` of a user's model, ready for every stage of the package.

  Args:
    model: a linen module (with ``variables``) or an NNX module (``variables``: None for
      its own state, an ``nnx.State`` or a variables mapping).
    variables: see ``model``.

  Returns:
    ``(intercept(model), variables)``; an NNX model's variables are a pure dict view.
  """
  model = intercept(model, train_arg)
  if isinstance(model, NNXModel):
    return model, model.variables if variables is None else model.variables_from(variables)
  return model, variables


def check_intercepted(model, variables, input_shape) -> None:
  """Rejects parameters that feed products no handled layer computes (linen:
  ``intercept.check_intercepted``; NNX: the same walk of the jaxpr, naming the
  parameter's attribute path, its ``nnx.Variable`` type and its module's type).

  Raises:
    ValueError: naming the first such parameter and how to make it searchable.
  """
  if not isinstance(model, NNXModel):
    intercept_lib.check_intercepted(model, variables, input_shape)
    return
  params = variables["params"]
  paths = [(path, keys) for path, keys in model._paths["params"]]
  leaves = [_get(params, keys, "params") for _, keys in paths]
  others = {c: variables[c] for c in COLLECTIONS if c != "params" and c in variables}
  handled: set[tuple[str, ...]] = set()

  def on_params(keys):
    handled.update({keys + ("kernel",), keys + ("bias",)})

  def run(leaves, others, x):
    view: dict = {}
    for (_, keys), leaf in zip(paths, leaves):
      _set(view, keys, leaf)
    return model.apply({"params": view, **others}, x, QContext(), train=False,
                       _on_params=on_params)

  def shape(a):
    return jax.ShapeDtypeStruct(np.shape(a), a.dtype)

  x = jax.ShapeDtypeStruct((1, *tuple(input_shape)), jnp.float32)
  closed = jax.make_jaxpr(run)([shape(a) for a in leaves], jax.tree.map(shape, others), x)
  jaxpr = closed.jaxpr
  labels = [frozenset([i]) for i in range(len(leaves))] + [frozenset()] * (
      len(jaxpr.invars) - len(leaves))
  found: dict[int, str] = {}
  intercept_lib.unhandled_products(jaxpr, labels, found)
  bad = [i for i in sorted(found) if paths[i][1] not in handled]
  if not bad:
    return
  i = bad[0]
  path, keys = paths[i]
  owner = keys[:-1]
  var_type = model.variable_types.get(("params", *keys), "Param")
  kind = model.module_types.get(owner, "?")
  others_bad = [attribute_path(paths[j][0]) for j in bad[1:]]
  more = f" (also: {others_bad})" if others_bad else ""
  raise ValueError(
      f"model: parameter {attribute_path(path)} (nnx.{var_type}, shape "
      f"{tuple(np.shape(leaves[i]))}) of module '{'/'.join(owner) or '<root>'}' (type "
      f"{kind}) feeds a {found[i]} outside the handled layers ({' / '.join(HANDLED_NAMES)}), "
      f"so it would stay float and be missing from the costs{more}; allowed: make that "
      "product searchable by computing it with one of those layers (e.g. "
      f"`x @ self.{keys[-1]}[...]` -> an nnx.Linear attribute holding the weight; an "
      "nnx.Einsum -> nnx.LinearGeneral; a convolution on a raw weight -> nnx.Conv)")


def update(module: nnx.Module, variables) -> nnx.Module:
  """Writes ``variables`` (a mapping in :attr:`NNXModel.variables`' structure, an
  ``nnx.State``, or the path of a ``variables.msgpack`` such as fine-tuning writes) into
  ``module`` in place (``nnx.update``) and returns it.

  Raises:
    ValueError: an unreadable file, or variables that do not match the module (naming
      every missing, unexpected or mis-shaped entry).
  """
  adapter = NNXModel(module)
  if isinstance(variables, (str, bytes)) or hasattr(variables, "__fspath__"):
    path = variables
    try:
      with open(path, "rb") as f:
        variables = flax.serialization.msgpack_restore(f.read())
    except OSError as e:
      raise ValueError(f"variables file {path}: cannot be read ({e.strerror})") from None
  nnx.update(module, adapter.state(adapter.variables_from(variables)))
  return module

