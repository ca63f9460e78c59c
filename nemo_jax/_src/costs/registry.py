"""Named objectives: an explicit registry of cost functions and their compiled entry points.

A :class:`CostRegistry` maps objective names (``bops_ratio``, ``energy:X|Y``,
``size_kb:csr``, ... and any user cost) to pure functions
``fn(workload, configs) -> float32 [P]`` (all minimised). Registries are values, passed
explicitly (``CostRegistry.default().with_cost("latency", fn)``), never global state:
a search config can name a user cost as ``"custom_costs": {"latency":
"my_pkg.costs:latency"}`` so that the CLI and a resumed run find it again
(``nemo_jax._src.registries``).

Compiled functions are cached per (workload, names, registry entries, chunking): one
compile per workload and batch shape. Validation happens at the public entry points
(:func:`compute_costs`, :func:`compute_objectives`) only.
"""

from __future__ import annotations

import numbers
import weakref
from typing import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemo_jax._src.qconfig import QuantConfig, validate_configs
from nemo_jax._src.costs.formulas import (COST_KEYS, _CODING_KEYS, _DATAFLOW_KEYS,
                                              check_coding, check_dataflow, cost_matrix)
from nemo_jax._src.workload import Workload

CostFn = Callable[[Workload, QuantConfig], jax.Array]

BUILTIN_KEYS: dict[str, str] = {k: k for k in (
    "params", "macs", "bops", "bops_ratio", "sparse_bops", "weight_bits",
    "sparse_weight_bits", "model_bits", "model_ratio", "weight_ratio", "act_peak_bits",
    "act_total_bits")}
BUILTIN_KEYS.update({f"size_kb:{c}": k for c, k in _CODING_KEYS.items()})
BUILTIN_KEYS.update({f"energy:{d}": k for d, k in _DATAFLOW_KEYS.items()})
"""Built-in objective name -> column of :func:`formulas.cost_matrix`."""


def _builtin(key: str) -> CostFn:
  return lambda workload, configs: cost_matrix(workload, configs, (key,))[..., 0]


class CostRegistry(Mapping[str, CostFn]):
  """An immutable mapping of objective names to cost functions (built-ins first).

  Built-in objectives are evaluated together in ONE :func:`formulas.cost_matrix` call;
  user costs are spliced in at their columns. Every built-in cost grows with every
  bit-width and with the keep ratio (:meth:`is_builtin` is used for the monotonicity
  argument of infeasible-bound checks).
  """

  def __init__(self, user: Mapping[str, CostFn] | None = None):
    self._user = dict(user or {})
    for name, fn in self._user.items():
      _check_entry(name, fn)
      if name in BUILTIN_KEYS:
        raise ValueError(f"name={name!r} is invalid: it is a built-in cost; allowed: a "
                         f"name not in {sorted(BUILTIN_KEYS)}")

  @classmethod
  def default(cls) -> "CostRegistry":
    """The built-in costs only."""
    return _DEFAULT

  def with_cost(self, name: str, fn: CostFn) -> "CostRegistry":
    """A new registry with ``fn(workload, configs) -> float32 [P]`` (minimised) added.

    Args:
      name: objective name used in configs (``"objectives": [..., name]``).
      fn: pure, traceable function of the static workload and a config batch
        (``w_bits[P, L]``, ``a_bits[P, La]``, ``keep[P]``), e.g. a latency lookup table
        gathered by bit-width.
    """
    if name in self._user:
      raise ValueError(f"name={name!r} is invalid: already registered; allowed: a new name")
    return CostRegistry({**self._user, name: fn})

  def is_builtin(self, name: str) -> bool:
    return name in BUILTIN_KEYS

  def __getitem__(self, name: str) -> CostFn:
    if name in BUILTIN_KEYS:
      return _BUILTIN_FNS[name]
    return self._user[name]

  def __iter__(self) -> Iterator[str]:
    yield from BUILTIN_KEYS
    yield from self._user

  def __len__(self) -> int:
    return len(BUILTIN_KEYS) + len(self._user)

  def _cache_key(self):
    return tuple(sorted((n, id(f)) for n, f in self._user.items()))

  def check(self, names: Sequence[str], field: str = "objectives") -> tuple[str, ...]:
    """Validates objective names; returns them as a tuple."""
    if isinstance(names, str):
      names = (names,)
    names = tuple(names)
    if not names:
      raise ValueError(f"{field}=[] is invalid; allowed: names from {list(self)}")
    for n in names:
      if n not in self:
        raise ValueError(f"{field}: unknown objective {n!r}; allowed: {list(self)}")
    return names


def _check_entry(name, fn):
  if not isinstance(name, str) or not name:
    raise ValueError(f"name={name!r} is invalid; allowed: a non-empty string")
  if not callable(fn):
    raise ValueError(f"fn={fn!r} is invalid; allowed: a callable (workload, configs) -> [P]")


_BUILTIN_FNS = {name: _builtin(key) for name, key in BUILTIN_KEYS.items()}
_DEFAULT = CostRegistry()

_COSTS_FNS: "weakref.WeakKeyDictionary[Workload, dict]" = weakref.WeakKeyDictionary()
_OBJECTIVE_FNS: dict = {}

DEFAULT_CPU_CHUNK = 4096
"""Configs per block on CPU: keeps intermediates cache-resident (~5x faster than one
block for 100k configs on 2 cores); accelerators evaluate the batch in one block."""


def _resolve_chunk(chunk_size) -> int | None:
  if isinstance(chunk_size, str) and chunk_size == "auto":
    return DEFAULT_CPU_CHUNK if jax.default_backend() == "cpu" else None
  if chunk_size is None:
    return None
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
      or chunk_size < 1):
    raise ValueError(f"chunk_size={chunk_size!r} is invalid; allowed: a positive integer, "
                     "None or 'auto'")
  return int(chunk_size)


def map_chunks(fn: Callable[[QuantConfig], jax.Array], configs: QuantConfig,
               chunk_size: int | None) -> jax.Array:
  """Applies ``fn: configs[P'] -> [P', ...]`` to blocks of ``chunk_size`` configs.

  A sequential ``fori_loop`` over ``ceil(P / chunk_size)`` blocks read with
  ``dynamic_slice`` (no copy of the inputs; the last block is shifted back to end at
  ``P`` and overlaps its predecessor, recomputing a few rows), writing into one output
  buffer. Keeps ``fn``'s intermediates cache-resident. (Padding or slicing the batch to
  a multiple of the block costs a full copy of the inputs: as much as the costs.)
  ``chunk_size=None`` or ``P <= chunk_size``: one call.
  """
  w = jnp.asarray(configs.w_bits)
  num = w.shape[0]
  if chunk_size is None or num <= chunk_size:
    return fn(configs)
  blocks = -(-num // chunk_size)
  keep = jnp.broadcast_to(jnp.asarray(configs.keep, jnp.float32), (num,))
  leaves = (w, jnp.asarray(configs.a_bits), keep)

  def block(start):
    return QuantConfig(*(jax.lax.dynamic_slice_in_dim(x, start, chunk_size)
                         for x in leaves))

  shape = jax.eval_shape(lambda: fn(block(0)))
  out = jnp.zeros((num,) + shape.shape[1:], shape.dtype)

  def body(i, out):
    start = jnp.minimum(i * chunk_size, num - chunk_size)
    return jax.lax.dynamic_update_slice_in_dim(out, fn(block(start)), start, axis=0)

  return jax.lax.fori_loop(0, blocks, body, out)


def costs_jnp(workload: Workload, configs: QuantConfig) -> dict:
  """All built-in costs of a config batch as a dict of ``float32 [P]`` (pure, traceable).

  Prefer :func:`compute_costs` (validated, jit-compiled and cached); this is the
  function it compiles, usable inside a caller's own jit.

  Returns:
    Dict with the keys :data:`formulas.COST_KEYS`, each ``[P]``.
  """
  m = cost_matrix(workload, configs)
  return {k: m[..., i] for i, k in enumerate(COST_KEYS)}


def make_costs_fn(workload: Workload, chunk_size="auto") -> Callable[[QuantConfig], dict]:
  """The jitted ``configs[P] -> dict of [P]`` of all built-in costs (cached; no validation).

  Args:
    workload: the workload.
    chunk_size: configs per block (see :func:`map_chunks`); ``"auto"``: 4096 on CPU,
      one block on accelerators.
  """
  chunk = _resolve_chunk(chunk_size)
  per_workload = _COSTS_FNS.setdefault(workload, {})
  fn = per_workload.get(chunk)
  if fn is None:
    def costs_fn(configs):
      m = map_chunks(lambda c: cost_matrix(workload, c), configs, chunk)
      return {k: m[:, i] for i, k in enumerate(COST_KEYS)}
    fn = per_workload[chunk] = jax.jit(costs_fn)
  return fn


def objectives_jnp(workload: Workload, configs: QuantConfig, names: Sequence[str],
                   registry: CostRegistry | None = None) -> jax.Array:
  """Objective matrix ``float32 [P, k]`` (pure, traceable; names not validated).

  Built-in objectives come from ONE :func:`formulas.cost_matrix` call (two matmuls);
  registered costs are evaluated and spliced in at their columns.
  """
  registry = registry or _DEFAULT
  builtin = [n for n in names if registry.is_builtin(n)]
  mat = (cost_matrix(workload, configs, [BUILTIN_KEYS[n] for n in builtin])
         if builtin else None)
  if len(builtin) == len(names):
    return mat
  cols = []
  for n in names:
    if n in builtin:
      cols.append(mat[..., builtin.index(n)])
    else:
      cols.append(jnp.asarray(registry[n](workload, configs), jnp.float32))
  return jnp.stack(cols, axis=-1)


def make_objectives_fn(workload: Workload, names: Sequence[str],
                       registry: CostRegistry | None = None, chunk_size="auto") -> Callable:
  """The jitted ``configs[P] -> float32 [P, k]`` for objective ``names`` (cached).

  Args:
    workload: the workload.
    names: objective names of ``registry``.
    registry: the cost registry (default: built-ins only).
    chunk_size: configs per block (see :func:`make_costs_fn`).
  """
  registry = registry or _DEFAULT
  names = registry.check(names)
  chunk = _resolve_chunk(chunk_size)
  key = (weakref.ref(workload), names, registry._cache_key(), chunk)
  fn = _OBJECTIVE_FNS.get(key)
  if fn is None:
    fn = jax.jit(lambda configs: map_chunks(
        lambda c: objectives_jnp(workload, c, names, registry), configs, chunk))
    _OBJECTIVE_FNS[key] = fn
  return fn


def _prepare(workload: Workload, configs: QuantConfig, validate: bool):
  single = np.ndim(configs.w_bits) == 1
  if validate and not any(isinstance(leaf, jax.core.Tracer)
                          for leaf in jax.tree_util.tree_leaves(configs)):
    configs = validate_configs(configs, workload.num_layers, workload.layer_names,
                               num_act_quantizers=workload.num_act_quantizers,
                               act_names=workload.act_names)
  if single:
    configs = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], configs)
  return configs, single


def compute_costs(workload: Workload, configs: QuantConfig, validate: bool = True,
                  chunk_size="auto") -> dict:
  """All built-in costs (``formulas.py``) for a config batch; all minimised.

  Args:
    workload: the workload.
    configs: ``QuantConfig`` with ``w_bits[P, L]``, ``a_bits[P, La]``, ``keep[P]`` (or one
      member without the P axis).
    validate: check shapes and values on the host first (skipped for tracers).
    chunk_size: configs per block (:func:`make_costs_fn`).

  Returns:
    Dict with keys :data:`formulas.COST_KEYS`, each ``float32 [P]`` (scalars for one
    member).
  """
  configs, single = _prepare(workload, configs, validate)
  out = make_costs_fn(workload, chunk_size)(configs)
  return {k: v[0] for k, v in out.items()} if single else out


def compute_objectives(workload: Workload, configs: QuantConfig, names: Sequence[str],
                       registry: CostRegistry | None = None, validate: bool = True,
                       chunk_size="auto") -> jax.Array:
  """Objective matrix ``float32 [P, k]`` for the ``names`` of ``registry`` (all minimised).

  Args:
    workload: the workload.
    configs: config batch (or one member).
    names: objective names (``list(registry)``).
    registry: the cost registry (default: built-ins only).
    validate: check configs on the host first.
    chunk_size: configs per block (:func:`make_costs_fn`).

  Returns:
    ``[P, k]`` (``[k]`` for one member).
  """
  fn = make_objectives_fn(workload, names, registry, chunk_size)
  configs, single = _prepare(workload, configs, validate)
  out = fn(configs)
  return out[0] if single else out


def emomc_energy(workload: Workload, configs: QuantConfig, dataflow: str) -> jax.Array:
  """EMOMC energy (0.01 mJ) ``[P]`` under ``dataflow`` (one of :data:`formulas.DATAFLOWS`)."""
  return compute_costs(workload, configs)[_DATAFLOW_KEYS[check_dataflow(dataflow)]]


def emomc_size_kb(workload: Workload, configs: QuantConfig, coding: str) -> jax.Array:
  """EMOMC model size in KB ``[P]`` under ``coding`` (one of :data:`formulas.CODINGS`)."""
  return compute_costs(workload, configs)[_CODING_KEYS[check_coding(coding)]]

