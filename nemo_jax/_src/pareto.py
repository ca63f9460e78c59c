"""Pareto toolkit in JAX: ranking, crowding, hypervolume, R2 and NSGA-II/III selection.

Every objective is MINIMISED (accuracy enters as error, ``1 - acc``). ``F`` is always an
array ``[N, M]``: N individuals (rows), M objectives (columns).

Every function is pure, has static output shapes and runs under ``jax.jit`` and
``jax.vmap`` (e.g. once per species). A validity mask marks padded or failed
individuals: ``valid`` is an optional bool array ``[N]``; rows containing a NaN are
always invalid, whatever ``valid`` says. Invalid rows never dominate anyone, are ranked
after every valid row, get crowding distance 0, are selected only once every valid row
is, and contribute nothing to hypervolume or R2.

Dominance follows the definition: ``a`` dominates ``b`` iff ``a <= b`` in every
objective and ``a < b`` in at least one, so equal points (duplicates) never dominate each
other and share a front.

Bad input (wrong ranks, mismatched lengths, a non-finite concrete reference point,
``k`` out of range) raises ``ValueError`` at trace time.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DEFAULT_BLOCK_SIZE = 1024
"""Rows per block of the blocked ranking path (memory ~ ``block_size * N / 8`` bytes)."""

_WORD_BITS = 32
_ASF_EPS = 1e-6  # off-axis weight of the achievement scalarising function (Deb & Jain)
_NADIR_EPS = 1e-6  # smallest accepted objective range when normalising (pymoo's value)


# ----------------------------------------------------------------------------- checks


def _as_objectives(F, name: str = "F") -> jax.Array:
  """Returns ``F`` as a floating array [N, M]; raises ValueError on the wrong rank."""
  F = jnp.asarray(F)
  if F.ndim != 2:
    raise ValueError(
        f"{name} must be a 2-D array [N individuals, M objectives] (all minimised); got "
        f"shape {tuple(F.shape)} (ndim={F.ndim}); allowed ndim: 2")
  if F.shape[1] < 1:
    raise ValueError(f"{name} must have at least one objective column; got shape "
                     f"{tuple(F.shape)}; allowed: M >= 1")
  if not jnp.issubdtype(F.dtype, jnp.floating):
    F = F.astype(jnp.result_type(float))
  return F


def _valid_mask(F: jax.Array, valid) -> jax.Array:
  """Combines the user's mask with "no NaN in the row"."""
  ok = ~jnp.any(jnp.isnan(F), axis=1)
  if valid is None:
    return ok
  valid = jnp.asarray(valid)
  if valid.shape != (F.shape[0],):
    raise ValueError(f"valid must be a bool array of shape ({F.shape[0]},) matching F's "
                     f"rows; got shape {tuple(valid.shape)}")
  return ok & valid.astype(bool)


def _concrete(x):
  """Returns ``x`` as numpy when it is known at trace time, else None."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _as_point(point, num_objectives: int, name: str) -> jax.Array:
  """Checks a reference-like point [M]; a concrete one must be finite."""
  point = jnp.asarray(point)
  if point.ndim == 0:
    raise ValueError(f"{name} must be a 1-D array of length M={num_objectives}; got a "
                     f"scalar {point}")
  if point.shape != (num_objectives,):
    raise ValueError(f"{name} must have shape ({num_objectives},) (one value per "
                     f"objective); got shape {tuple(point.shape)}")
  concrete = _concrete(point)
  if concrete is not None and not np.all(np.isfinite(concrete)):
    raise ValueError(f"{name} must be finite; got {concrete.tolist()}; allowed: finite "
                     "real numbers")
  return point


def _check_k(k, n: int) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise ValueError(f"k must be a Python int (static survivor count); got {k!r}")
  if not 0 <= k <= n:
    raise ValueError(f"k must be in [0, N={n}]; got k={k}")
  return int(k)


def _hv_dtype():
  """float64 when x64 is enabled (needed for 1e-9 accuracy), else float32."""
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


# ----------------------------------------------------------------------------- dominance


def _dominates(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a`` Pareto-dominates ``b`` (broadcast over leading axes, objectives last)."""
  return jnp.all(a <= b, axis=-1) & jnp.any(a < b, axis=-1)


def _pack_bits(mask: jax.Array) -> jax.Array:
  """Packs bools [..., 32 W] into uint32 words [..., W] (bit b of word w = item 32w+b)."""
  *lead, n = mask.shape
  bits = mask.reshape(*lead, n // _WORD_BITS, _WORD_BITS).astype(jnp.uint32)
  shifts = jnp.arange(_WORD_BITS, dtype=jnp.uint32)
  return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)


def _pad_rows(x: jax.Array, n: int, value) -> jax.Array:
  pad = n - x.shape[0]
  if pad == 0:
    return x
  return jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], value, x.dtype)], axis=0)


def _peel_block(F: jax.Array, ok: jax.Array, base: jax.Array) -> jax.Array:
  """Ranks of one block given lower bounds ``base`` set by dominators outside it.

  rank[j] = max(base[j], max over in-block dominators i of rank[i] + 1), i.e. the
  length of the longest dominance chain ending at j. Computed by peeling with a bit-packed
  dominator matrix: at step t a row is assigned rank t once ``base <= t`` and none of its
  in-block dominators is still unassigned. One step costs B * B / 32 word operations, so
  peeling is cheap next to the B * B * M comparisons that build the matrix.

  Args:
    F: objectives [B, M], B a multiple of 32.
    ok: valid rows [B]; invalid rows neither dominate nor get a rank here.
    base: int32 [B] lower bounds on the ranks.

  Returns:
    int32 [B] ranks (0 for invalid rows).
  """
  dominators = _pack_bits(_dominates(F[None, :, :], F[:, None, :]) & ok[None, :])  # [j, w]
  big = jnp.iinfo(jnp.int32).max
  start = jnp.where(jnp.any(ok), jnp.min(jnp.where(ok, base, big)), 0)

  def cond(carry):
    return jnp.any(carry[1])

  def body(carry):
    t, remaining, rank = carry
    remaining_words = _pack_bits(remaining)
    free = jnp.all((dominators & remaining_words[None, :]) == 0, axis=1)
    ready = remaining & free & (base <= t)
    return t + 1, remaining & ~ready, jnp.where(ready, t, rank)

  init = (start.astype(jnp.int32), ok, jnp.zeros(F.shape[0], jnp.int32))
  return lax.while_loop(cond, body, init)[2]


def _lex_order(F: jax.Array, ok: jax.Array) -> jax.Array:
  """Valid rows first, then lexicographic in (f_0, f_1, ...): dominators come first."""
  keys = [F[:, m] for m in reversed(range(F.shape[1]))] + [~ok]
  return jnp.lexsort(keys)


def _rank_blocked(F: jax.Array, ok: jax.Array, block_size: int) -> jax.Array:
  """Non-dominated ranks of valid rows for any M with O(block_size * N) memory.

  Rows are sorted lexicographically, so every dominator of a row lies in its block or an
  earlier one. Blocks are processed in order: the finished ranks of earlier blocks give
  each row a lower bound (one B x B masked max per earlier block, never an N x N array),
  then the block is peeled with bit-packed dominance (``_peel_block``). A single block
  (N <= block_size) needs no sort.
  """
  n = F.shape[0]
  if n <= block_size:
    padded = -(-n // _WORD_BITS) * _WORD_BITS
    ranks = _peel_block(_pad_rows(F, padded, 0), _pad_rows(ok, padded, False),
                        jnp.zeros(padded, jnp.int32))
    return ranks[:n]

  block = -(-block_size // _WORD_BITS) * _WORD_BITS
  num_blocks = -(-n // block)
  order = _lex_order(F, ok)
  Fs = _pad_rows(F[order], num_blocks * block, 0)
  oks = _pad_rows(ok[order], num_blocks * block, False)

  def one_block(b, ranks):
    Fb = lax.dynamic_slice_in_dim(Fs, b * block, block)
    okb = lax.dynamic_slice_in_dim(oks, b * block, block)

    def earlier_block(c, base):
      Fc = lax.dynamic_slice_in_dim(Fs, c * block, block)
      okc = lax.dynamic_slice_in_dim(oks, c * block, block)
      rc = lax.dynamic_slice_in_dim(ranks, c * block, block)
      dominated_by = _dominates(Fc[None, :, :], Fb[:, None, :]) & okc[None, :]  # [j, i]
      return jnp.maximum(base, jnp.max(jnp.where(dominated_by, rc[None, :] + 1, 0), axis=1))

    base = lax.fori_loop(0, b, earlier_block, jnp.zeros(block, jnp.int32))
    return lax.dynamic_update_slice_in_dim(ranks, _peel_block(Fb, okb, base), b * block, 0)

  ranks_sorted = lax.fori_loop(0, num_blocks, one_block,
                               jnp.zeros(num_blocks * block, jnp.int32))
  return jnp.zeros(n, jnp.int32).at[order].set(ranks_sorted[:n])


def _rank_2d(F: jax.Array, ok: jax.Array) -> jax.Array:
  """Non-dominated ranks for M = 2 by a patience-sorting scan, O(N^1.5) work.

  After a lexicographic sort by (f1, f2) only earlier rows can dominate a row, and a row
  is dominated by some member of front k iff it is dominated by that front's last-added
  member (its "tail"): ``tail < row`` in lexicographic (f2, f1) order. Tails increase
  across fronts, so a row's front is the number of tails below it, found by a two-level
  count (every G-th tail, then G tails, G ~ sqrt(N)) instead of a binary search, whose
  many tiny steps cost more than two fused vector reductions on CPU.
  """
  n = F.shape[0]
  group = max(_WORD_BITS, 1 << math.ceil(math.log2(math.sqrt(n + 1))))
  capacity = -(-(n + 1) // group) * group
  order = _lex_order(F, ok)
  coarse_index = jnp.arange(0, capacity, group)
  fine_offset = jnp.arange(group)

  def step(carry, row):
    tail1, tail2, num_fronts = carry
    a, b, take = row

    def tail_dominates(t1, t2, index):
      return (index < num_fronts) & ((t2 < b) | ((t2 == b) & (t1 < a)))

    coarse = jnp.sum(tail_dominates(tail1[::group], tail2[::group], coarse_index))
    start = jnp.maximum(coarse - 1, 0) * group
    fine = jnp.sum(tail_dominates(lax.dynamic_slice_in_dim(tail1, start, group),
                                  lax.dynamic_slice_in_dim(tail2, start, group),
                                  start + fine_offset))
    front = jnp.where(coarse == 0, 0, start + fine).astype(jnp.int32)
    tail1 = tail1.at[front].set(jnp.where(take, a, tail1[front]))
    tail2 = tail2.at[front].set(jnp.where(take, b, tail2[front]))
    num_fronts = jnp.where(take & (front == num_fronts), num_fronts + 1, num_fronts)
    return (tail1, tail2, num_fronts), front

  init = (jnp.zeros(capacity, F.dtype), jnp.zeros(capacity, F.dtype), jnp.int32(0))
  _, ranks_sorted = lax.scan(step, init, (F[order, 0], F[order, 1], ok[order]))
  return jnp.zeros(n, jnp.int32).at[order].set(ranks_sorted)


def _finish_ranks(ranks: jax.Array, ok: jax.Array) -> jax.Array:
  """Invalid rows get (largest valid rank + 1); 0 when no row is valid."""
  last = jnp.where(jnp.any(ok), jnp.max(jnp.where(ok, ranks, -1)) + 1, 0)
  return jnp.where(ok, ranks, last).astype(jnp.int32)


def _ranks_of_valid(F: jax.Array, ok: jax.Array, block_size: int | None) -> jax.Array:
  F = jnp.where(ok[:, None], F, 0)  # NaN-free, so sorting is well defined
  if F.shape[0] == 0:
    return jnp.zeros(0, jnp.int32)
  if F.shape[1] == 2:
    return _rank_2d(F, ok)
  return _rank_blocked(F, ok, block_size or DEFAULT_BLOCK_SIZE)


def nondominated_rank(F, valid=None, *, block_size: int | None = None) -> jax.Array:
  """Non-dominated sorting: the Pareto front index of every row (objectives minimised).

  Rank 0 is the first (non-dominated) front, rank r+1 holds the rows that are
  non-dominated once fronts 0..r are removed. Equal rows do not dominate each other and
  share a rank. Invalid rows (``valid`` False or any NaN) get rank
  ``max(valid ranks) + 1`` (0 if no row is valid), so they always come last.

  Algorithm: M = 2 uses a sort plus a patience-sorting scan (O(N^1.5)); other M use
  bit-packed dominance peeling in blocks of ``block_size`` rows (O(N^2 M) comparisons,
  O(block_size * N) memory), so N = 100,000 ranks without an N x N array.

  Args:
    F: objectives [N, M], all minimised.
    valid: optional bool [N]; False marks padded or failed rows.
    block_size: rows per block for M != 2 (static); default ``DEFAULT_BLOCK_SIZE``.

  Returns:
    int32 [N] front index per row.
  """
  F = _as_objectives(F)
  ok = _valid_mask(F, valid)
  return _finish_ranks(_ranks_of_valid(F, ok, block_size), ok)


def nondominated_mask(F, valid=None, *, block_size: int | None = None) -> jax.Array:
  """Bool [N]: True for valid rows that no valid row dominates (the first front).

  Objectives are minimised. Duplicates of a non-dominated point are all True.

  Args:
    F: objectives [N, M], all minimised.
    valid: optional bool [N]; invalid rows are False and never dominate.
    block_size: rows checked per chunk (static); memory is O(block_size * N).

  Returns:
    bool [N].
  """
  F = _as_objectives(F)
  ok = _valid_mask(F, valid)
  n = F.shape[0]
  if n == 0:
    return jnp.zeros(0, bool)
  F = jnp.where(ok[:, None], F, 0)
  if F.shape[1] == 2:
    # Sorted by (f1, f2), a row is dominated iff a lexicographically smaller valid row
    # (so not a duplicate) has f2 <= its f2. Equal rows are adjacent: the head of each
    # run of equal rows is compared with the minimum f2 before it, and the run shares it.
    order = _lex_order(F, ok)
    f1, f2, oks = F[order, 0], F[order, 1], ok[order]
    inf = jnp.array(jnp.inf, F.dtype)
    min_before = jnp.concatenate([inf[None], lax.cummin(jnp.where(oks, f2, inf))[:-1]])
    any_before = jnp.arange(n) > 0  # valid rows come first, so earlier rows are valid
    new_run = jnp.concatenate([jnp.ones(1, bool), (f1[1:] != f1[:-1]) | (f2[1:] != f2[:-1])])
    run = jnp.cumsum(new_run.astype(jnp.int32)) - 1
    head_dominated = new_run & any_before & (min_before <= f2)
    run_dominated = jax.ops.segment_max(head_dominated.astype(jnp.int32), run,
                                        num_segments=n)[run] > 0
    first_front = oks & ~run_dominated
    return jnp.zeros(n, bool).at[order].set(first_front)

  block = min(block_size or DEFAULT_BLOCK_SIZE, n)
  num_blocks = -(-n // block)
  Fp = _pad_rows(F, num_blocks * block, 0).reshape(num_blocks, block, -1)

  def dominated_rows(Fb):
    return jnp.any(_dominates(F[None, :, :], Fb[:, None, :]) & ok[None, :], axis=1)

  dominated = lax.map(dominated_rows, Fp).reshape(-1)[:n]
  return ok & ~dominated


def constrained_rank(F, violation, valid=None, *, block_size: int | None = None
                     ) -> jax.Array:
  """Ranks under Deb's constraint domination (objectives minimised).

  A feasible row (total violation <= 0) dominates every infeasible one; between
  infeasible rows the smaller total violation dominates (equal violations tie); between
  feasible rows Pareto dominance applies. Hence feasible rows get their Pareto ranks
  0..R, infeasible rows ranks R+1, R+2, ... by increasing distinct violation, and
  invalid rows come last (max rank + 1).

  Args:
    F: objectives [N, M], all minimised.
    violation: [N] total constraint violation, or [N, C] per-constraint values ``g``
      (constraint ``g <= 0``), summed as ``sum(max(g, 0))``.
    valid: optional bool [N]. A NaN violation also makes a row invalid.
    block_size: see ``nondominated_rank``.

  Returns:
    int32 [N] ranks.
  """
  F = _as_objectives(F)
  n = F.shape[0]
  violation = _total_violation(violation, n)
  ok = _valid_mask(F, valid) & ~jnp.isnan(violation)
  feasible = ok & (violation <= 0)
  infeasible = ok & ~feasible
  feasible_ranks = _ranks_of_valid(F, feasible, block_size)
  num_feasible_fronts = jnp.where(
      jnp.any(feasible), jnp.max(jnp.where(feasible, feasible_ranks, -1)) + 1, 0)
  # Dense rank of each infeasible violation among the infeasible rows.
  v = jnp.where(infeasible, violation, jnp.inf)
  order = jnp.argsort(v, stable=True)
  vs = v[order]
  new_value = jnp.concatenate([jnp.ones(1, bool), vs[1:] != vs[:-1]])
  dense_sorted = jnp.cumsum(new_value.astype(jnp.int32)) - 1
  dense = jnp.zeros(n, jnp.int32).at[order].set(dense_sorted)
  ranks = jnp.where(feasible, feasible_ranks, num_feasible_fronts + dense)
  return _finish_ranks(ranks, ok)


# ----------------------------------------------------------------------------- crowding


def crowding_distance(F, rank=None, valid=None) -> jax.Array:
  """NSGA-II crowding distance within each front (Deb et al. 2002).

  For each objective, the members of a front are sorted by that objective (ties by row
  index); the first and last get +inf, every other member adds
  ``(f[next] - f[prev]) / (f_max - f_min)`` of its front (0 when the front's range is
  0). Fronts of one or two members are all +inf. Invalid rows get 0.

  Args:
    F: objectives [N, M], all minimised.
    rank: optional int [N] front indices (computed with ``nondominated_rank`` if None).
    valid: optional bool [N].

  Returns:
    [N] crowding distances (larger = less crowded).
  """
  F = _as_objectives(F)
  ok = _valid_mask(F, valid)
  n = F.shape[0]
  if rank is None:
    rank = nondominated_rank(F, ok)
  rank = jnp.asarray(rank)
  if rank.shape != (n,):
    raise ValueError(f"rank must have shape ({n},) matching F's rows; got shape "
                     f"{tuple(rank.shape)}")
  if n == 0:
    return jnp.zeros(0, F.dtype)
  F = jnp.where(ok[:, None], F, 0)
  group = jnp.where(ok, rank.astype(jnp.int32), -1)  # invalid rows in their own group
  index = jnp.arange(n, dtype=jnp.int32)

  def one_objective(f):
    """Contribution of one objective, in row order."""
    _, f, order = lax.sort((group, f, index), num_keys=3)
    g = group[order]
    first = jnp.concatenate([jnp.ones(1, bool), g[1:] != g[:-1]])
    last = jnp.concatenate([g[1:] != g[:-1], jnp.ones(1, bool)])
    segment = jnp.cumsum(first.astype(jnp.int32)) - 1
    # Sorted within each front, so the front's range is last minus first value.
    lowest = jax.ops.segment_min(f, segment, num_segments=n)[segment]
    highest = jax.ops.segment_max(f, segment, num_segments=n)[segment]
    span = highest - lowest
    gap = jnp.concatenate([f[1:], f[-1:]]) - jnp.concatenate([f[:1], f[:-1]])
    interior = jnp.where(span > 0, gap / jnp.where(span > 0, span, 1), 0)
    interior = jnp.where(jnp.isnan(interior), 0, interior)  # inf - inf in infinite rows
    contribution = jnp.where(first | last, jnp.inf, interior)
    return jnp.zeros(n, f.dtype).at[order].set(contribution)

  distance = jnp.sum(jax.vmap(one_objective, in_axes=1)(F), axis=0)
  return jnp.where(ok, distance, 0)


# ----------------------------------------------------------------------------- hypervolume


def _hv_prepare(F, ref, valid):
  """Casts to the HV dtype; rows that are invalid or do not strictly dominate ``ref``
  become inactive and are moved onto ``ref`` (zero volume)."""
  F = _as_objectives(F)
  ref = _as_point(ref, F.shape[1], "ref")
  ok = _valid_mask(F, valid)
  dtype = _hv_dtype()
  F, ref = F.astype(dtype), ref.astype(dtype)
  active = ok & jnp.all(jnp.where(ok[:, None], F, ref) < ref, axis=1)
  return jnp.where(active[:, None], F, ref), ref, active


class _Sweep:
  """Sort orders of clipped points [N, M] shared by every subset mask.

  The exact hypervolume of a subset is computed with the subset given as a mask, so the
  sorting is done once and leave-one-out contributions or the slab recursion for M >= 4
  just vmap the masked volume over masks.
  """

  def __init__(self, F: jax.Array, ref: jax.Array):
    self.F, self.ref = F, ref
    n, m = F.shape
    # Order along objective 0: row order, slot of each row, slab widths.
    order0 = jnp.argsort(F[:, 0], stable=True)
    self.slot0 = jnp.zeros(n, jnp.int32).at[order0].set(jnp.arange(n, dtype=jnp.int32))
    f0 = F[order0, 0]
    self.order0 = order0
    self.width0 = jnp.concatenate([f0[1:], ref[:1]]) - f0
    if m >= 3:
      # Order along the last objective and slab thickness for the sweep.
      order_last = jnp.argsort(F[:, m - 1], stable=True)
      fl = F[order_last, m - 1]
      self.order_last = order_last
      self.thickness = jnp.concatenate([fl[1:], ref[m - 1:]]) - fl
      self.position_last = jnp.zeros(n, jnp.int32).at[order_last].set(
          jnp.arange(n, dtype=jnp.int32))


def _hv2_masked(sweep: _Sweep, mask: jax.Array) -> jax.Array:
  """Area dominated by the masked rows, using objectives 0 and 1 of ``sweep.F``."""
  ref1 = sweep.ref[1]
  f1 = jnp.where(mask, sweep.F[:, 1], ref1)[sweep.order0]
  return jnp.sum(sweep.width0 * (ref1 - lax.cummin(f1)))


def _hv3_masked(sweep: _Sweep, mask: jax.Array) -> jax.Array:
  """Volume dominated by the masked rows in objectives 0..2 (last = objective 2).

  Sweep over objective 2 in increasing order: the (f0, f1) staircase of rows seen so far
  is kept as ``height[s]`` = lowest f1 over rows whose objective-0 slot is <= s; its
  area times the slab thickness accumulates the volume. O(N) per row, O(N^2) total.
  """
  F, ref = sweep.F, sweep.ref
  slots = jnp.arange(F.shape[0], dtype=jnp.int32)

  def step(k, carry):
    height, volume = carry
    row = sweep.order_last[k]
    covers = (slots >= sweep.slot0[row]) & mask[row]
    height = jnp.where(covers, jnp.minimum(height, F[row, 1]), height)
    area = jnp.sum(sweep.width0 * (ref[1] - height))
    return height, volume + area * sweep.thickness[k]

  init = (jnp.full(F.shape[0], ref[1], F.dtype), jnp.zeros((), F.dtype))
  return lax.fori_loop(0, F.shape[0], step, init)[1]


def _hv_masked(F: jax.Array, ref: jax.Array, mask: jax.Array,
               batch_size: int = 64) -> jax.Array:
  """Exact volume dominated by the masked rows of clipped ``F`` (rows <= ref)."""
  m = F.shape[1]
  if m == 1:
    return jnp.maximum(ref[0] - jnp.min(jnp.where(mask, F[:, 0], ref[0])), 0)
  sweep = _Sweep(F, ref)
  if m == 2:
    return _hv2_masked(sweep, mask)
  if m == 3:
    return _hv3_masked(sweep, mask)
  # M >= 4: slice along the last objective; each slab's cross-section is the
  # (M-1)-dimensional volume of the rows already passed (HSO-style dimension sweep).
  lower, lower_ref = F[:, :m - 1], ref[:m - 1]

  def slab(k):
    below = mask & (sweep.position_last <= k)
    return _hv_masked(lower, lower_ref, below, batch_size)

  sections = lax.map(slab, jnp.arange(F.shape[0]), batch_size=batch_size)
  return jnp.sum(sections * sweep.thickness)


def reference_point(ref, num_objectives: int) -> tuple[float, ...]:
  """A hypervolume reference point: ``ref``, or 1 per objective (the FP32 model's
  normalised costs; error 1) when it is None."""
  return tuple(float(r) for r in ref) if ref is not None else (1.0,) * num_objectives


def hypervolume(F, ref, valid=None) -> jax.Array:
  """Exact hypervolume (Lebesgue measure) dominated by ``F`` and bounded by ``ref``.

  Objectives are minimised: the measured region is ``{x : exists i, F[i] <= x < ref}``.
  Rows that do not strictly dominate ``ref`` in every objective, invalid rows and NaN
  rows contribute nothing. Computed in float64 when ``jax_enable_x64`` is on (needed for
  ~1e-12 relative accuracy), else float32.

  Method: M = 2 sort + cumulative min, O(N log N); M = 3 sweep along f3 over a 2-D
  staircase, O(N^2) time, O(N) memory; M >= 4 exact dimension-sweep recursion (slabs
  along the last objective, each an (M-1)-D volume), O(N^(M-1)) time: fine for
  N <= ~300 at M = 4; use ``hypervolume_monte_carlo`` for larger sets.

  Args:
    F: objectives [N, M], all minimised.
    ref: reference point [M]; must be finite (checked at trace time when concrete).
    valid: optional bool [N].

  Returns:
    scalar hypervolume (>= 0).
  """
  F, ref, active = _hv_prepare(F, ref, valid)
  if F.shape[0] == 0:
    return jnp.zeros((), F.dtype)
  return _hv_masked(F, ref, active)


def hypervolume_contributions(F, ref, valid=None, *, batch_size: int = 64) -> jax.Array:
  """Exclusive hypervolume contribution ``HV(S) - HV(S minus {i})`` of every row.

  Objectives are minimised. Dominated and duplicated rows contribute 0; a dominated row
  still counts when computing the others' contributions (moocore's
  ``hv_contributions(..., ignore_dominated=False)``). Invalid rows and rows not strictly
  dominating ``ref`` get 0. Computed exactly as N leave-one-out volumes sharing one sort
  (M = 2: O(N^2), M = 3: O(N^3), batched by ``batch_size`` masks at a time); use x64 for
  small contributions next to a large total.

  Args:
    F: objectives [N, M], all minimised.
    ref: reference point [M], finite.
    valid: optional bool [N].
    batch_size: leave-one-out masks evaluated at once (memory ~ batch_size * N).

  Returns:
    [N] contributions (>= 0).
  """
  F, ref, active = _hv_prepare(F, ref, valid)
  n = F.shape[0]
  if n == 0:
    return jnp.zeros(0, F.dtype)
  total = _hv_masked(F, ref, active)
  rows = jnp.arange(n)

  def without(i):
    return _hv_masked(F, ref, active & (rows != i))

  rest = lax.map(without, rows, batch_size=batch_size)
  return jnp.where(active, jnp.maximum(total - rest, 0), 0)


def hypervolume_monte_carlo(F, ref, key, valid=None, *, num_samples: int = 100_000,
                            chunk_size: int = 4096) -> jax.Array:
  """Unbiased Monte-Carlo hypervolume estimate for any M (objectives minimised).

  Samples ``num_samples`` points uniformly in the box [ideal, ref) (ideal = per-objective
  minimum of the active rows) and scales the dominated fraction by the box volume.
  Standard error ~ box_volume * sqrt(p (1 - p) / num_samples). Use it when the exact
  O(N^(M-1)) sweep of ``hypervolume`` is too slow (M >= 4, large N).

  Args:
    F: objectives [N, M], all minimised.
    ref: reference point [M], finite.
    key: PRNG key.
    valid: optional bool [N].
    num_samples: number of uniform samples (static).
    chunk_size: samples tested at once (memory ~ chunk_size * N * M).

  Returns:
    scalar estimate.
  """
  F, ref, active = _hv_prepare(F, ref, valid)
  ideal = jnp.min(jnp.where(active[:, None], F, ref), axis=0)
  box = jnp.prod(ref - ideal)
  num_chunks = -(-num_samples // chunk_size)
  keys = jax.random.split(key, num_chunks)

  def count(chunk_key):
    u = jax.random.uniform(chunk_key, (chunk_size, F.shape[1]), F.dtype)
    x = ideal + u * (ref - ideal)
    hit = jnp.any(jnp.all(F[None, :, :] <= x[:, None, :], axis=-1) & active[None, :], 1)
    return jnp.sum(hit)

  hits = jnp.sum(lax.map(count, keys))
  return box * hits / (num_chunks * chunk_size)


# ----------------------------------------------------------------------------- R2, weights


def r2_indicator(F, utopia, weights, valid=None) -> jax.Array:
  """R2 indicator, Tchebycheff form (lower is better; objectives minimised).

  ``R2 = mean over weight vectors w of min over valid rows of max_j w_j |z*_j - f_j|``
  with ``z*`` the utopian point. With no valid row the result is +inf.

  Args:
    F: objectives [N, M], all minimised.
    utopia: utopian point z* [M] (e.g. (0 error, 0 memory, 0 BOPs)).
    weights: weight vectors [W, M] (e.g. ``uniform_weights``).
    valid: optional bool [N].

  Returns:
    scalar R2 value.
  """
  F = _as_objectives(F)
  utopia = _as_point(utopia, F.shape[1], "utopia")
  weights = jnp.asarray(weights)
  if weights.ndim != 2 or weights.shape[1] != F.shape[1]:
    raise ValueError(f"weights must have shape (W, {F.shape[1]}); got shape "
                     f"{tuple(weights.shape)}")
  ok = _valid_mask(F, valid)
  F = jnp.where(ok[:, None], F, 0)
  scalarised = jnp.max(weights[:, None, :] * jnp.abs(utopia - F)[None, :, :], axis=-1)
  best = jnp.min(jnp.where(ok[None, :], scalarised, jnp.inf), axis=1)
  return jnp.mean(best)


def uniform_weights(n_obj: int, n_partitions: int) -> jax.Array:
  """Das-Dennis uniformly spread weight vectors on the unit simplex.

  All vectors with entries in {0, 1/H, ..., 1} summing to 1, H = ``n_partitions``:
  ``C(H + M - 1, M - 1)`` rows. Built with numpy (shapes are static), so call it outside
  jit and pass the result in.

  Args:
    n_obj: number of objectives M >= 1.
    n_partitions: divisions H >= 1 of each axis.

  Returns:
    [C(H + M - 1, M - 1), M] weights, rows in lexicographically decreasing order.
  """
  for name, value in (("n_obj", n_obj), ("n_partitions", n_partitions)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be an int >= 1; got {value!r}")
  rows = []
  # Stars and bars: positions of the M-1 bars among H + M - 1 slots.
  for bars in itertools.combinations(range(n_partitions + n_obj - 1), n_obj - 1):
    edges = (-1,) + bars + (n_partitions + n_obj - 1,)
    rows.append([edges[i + 1] - edges[i] - 1 for i in range(n_obj)])
  weights = np.asarray(rows, np.float64) / n_partitions
  return jnp.asarray(weights[np.lexsort(weights.T[::-1])[::-1]])


# ----------------------------------------------------------------------------- selection


def _total_violation(violation, n: int) -> jax.Array:
  """Total violation [N] from [N] totals or [N, C] constraint values ``g <= 0``."""
  violation = jnp.asarray(violation)
  if violation.ndim == 2 and violation.shape[0] == n:
    violation = jnp.sum(jnp.maximum(violation, 0), axis=1)
  if violation.shape != (n,):
    raise ValueError(f"violation must have shape ({n},) or ({n}, C); got shape "
                     f"{tuple(violation.shape)}")
  if not jnp.issubdtype(violation.dtype, jnp.floating):
    violation = violation.astype(jnp.result_type(float))
  return violation


def _check_count(k, n: int):
  """``k`` for a priority: a Python int in [0, N] (checked) or a traced int scalar."""
  if isinstance(k, bool):
    raise ValueError(f"k must be an int (number of survivors); got {k!r}")
  if isinstance(k, (int, np.integer)):
    return _check_k(k, n)
  k = jnp.asarray(k)
  if k.ndim != 0 or not jnp.issubdtype(k.dtype, jnp.integer):
    raise ValueError(f"k must be an int or an int scalar array; got shape "
                     f"{tuple(k.shape)}, dtype {k.dtype}")
  return k


def _selection_ranks(F, valid, violation):
  """Validity (incl. a NaN violation) and front index under (constrained) domination.

  Returns:
    ``(F with invalid rows zeroed, ok bool [N], rank int32 [N])``.
  """
  F = _as_objectives(F)
  ok = _valid_mask(F, valid)
  if violation is not None:
    violation = _total_violation(violation, F.shape[0])
    ok = ok & ~jnp.isnan(violation)
  F = jnp.where(ok[:, None], F, 0)
  if violation is None:
    rank = nondominated_rank(F, ok)
  else:
    rank = constrained_rank(F, jnp.where(ok, violation, 0), valid=ok)
  return F, ok, rank


def _inverse_permutation(order: jax.Array) -> jax.Array:
  n = order.shape[0]
  return jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))


def nsga2_priority(F, valid=None, violation=None) -> jax.Array:
  """NSGA-II order of every row: rank, then descending crowding distance, then index.

  Objectives are minimised. With ``violation``, ranks follow Deb's constraint
  domination (see ``constrained_rank``). Invalid rows (``valid`` False, a NaN objective
  or violation) come last, by index.

  Args:
    F: objectives [N, M], all minimised.
    valid: optional bool [N].
    violation: optional [N] total constraint violation (<= 0 feasible) or [N, C]
      constraint values ``g <= 0``.

  Returns:
    int32 [N] priority, a permutation of 0..N-1 (0 = best): the k rows with priority
    < k are NSGA-II's k survivors.
  """
  F, ok, rank = _selection_ranks(F, valid, violation)
  crowding = crowding_distance(F, rank, ok)
  index = jnp.arange(F.shape[0], dtype=jnp.int32)
  _, _, order = lax.sort((rank, -crowding, index), num_keys=3)
  return _inverse_permutation(order)


def nsga2_select(F, k: int, valid=None, violation=None) -> jax.Array:
  """NSGA-II survival: the k rows first by rank, then by descending crowding distance.

  Objectives are minimised. Ties (same rank and crowding) go to the lower row index, so
  the result is deterministic. Invalid rows are chosen only after every valid row.

  Args:
    F: objectives [N, M], all minimised.
    k: number of survivors (static), 0 <= k <= N.
    valid: optional bool [N].
    violation: optional constraint violation, see ``nsga2_priority``.

  Returns:
    int32 [k] indices of the survivors, best first.
  """
  F = _as_objectives(F)
  k = _check_k(k, F.shape[0])
  order = jnp.argsort(nsga2_priority(F, valid, violation))
  return order[:k].astype(jnp.int32)


def _normalise_nsga3(F, considered, first_front):
  """Deb & Jain (2014) normalisation with pymoo's fallbacks for degenerate cases.

  Ideal point = per-objective minimum of the considered rows; extreme points minimise
  the ASF along each axis; the hyperplane through them gives the intercepts. If the
  system is singular (also when two axes share an extreme point), an intercept is
  <= 1e-6 or not finite, the nadir falls back to the worst of the first front; any
  objective whose range is still <= 1e-6 uses the worst of the considered rows, and a
  remaining zero range is replaced by 1.

  Args:
    F: objectives [N, M] (finite in the considered rows).
    considered: bool [N] rows that define the normalisation.
    first_front: bool [N] the first front (nadir fallback).

  Returns:
    ``(ideal [M], span [M])``: row i normalises to ``(F[i] - ideal) / span``.
  """
  m = F.shape[1]
  inf = jnp.array(jnp.inf, F.dtype)
  ideal = jnp.min(jnp.where(considered[:, None], F, inf), axis=0)
  translated = jnp.where(considered[:, None], F - ideal, 0)
  worst = jnp.max(jnp.where(considered[:, None], translated, -inf), axis=0)
  worst_front = jnp.max(jnp.where(first_front[:, None], translated, -inf), axis=0)
  axis_weights = jnp.where(jnp.eye(m, dtype=bool), 1.0, _ASF_EPS).astype(F.dtype)
  asf = jnp.max(translated[None, :, :] / axis_weights[:, None, :], axis=-1)  # [M, N]
  extremes = jnp.argmin(jnp.where(considered[None, :], asf, inf), axis=1)
  E = translated[extremes]  # [M, M]
  plane = jnp.linalg.solve(E, jnp.ones(m, F.dtype))
  intercepts = 1 / plane
  fits = jnp.allclose(E @ plane, jnp.ones(m, F.dtype), rtol=1e-5, atol=1e-6)
  # One point extreme for two axes leaves the hyperplane undefined; whether the solver
  # notices depends on its rounding, so check it exactly.
  same = jnp.all(E[:, None, :] == E[None, :, :], axis=-1) & ~jnp.eye(m, dtype=bool)
  good = (fits & ~jnp.any(same) & jnp.all(jnp.isfinite(intercepts))
          & jnp.all(intercepts > _NADIR_EPS))
  span = jnp.where(good, jnp.minimum(intercepts, worst), worst_front)
  span = jnp.where(span <= _NADIR_EPS, worst, span)
  span = jnp.where(span <= _NADIR_EPS, 1, span)
  return ideal, span


def _check_ref_dirs(ref_dirs, m: int) -> jax.Array:
  ref_dirs = jnp.asarray(ref_dirs)
  if ref_dirs.ndim != 2 or ref_dirs.shape[1] != m or ref_dirs.shape[0] < 1:
    raise ValueError(f"ref_dirs must have shape (H >= 1, {m}); got shape "
                     f"{tuple(ref_dirs.shape)}")
  return ref_dirs


def _last_front(rank, ok, k):
  """The front that reaches ``k`` valid rows (N + 1 when fewer than k are valid)."""
  n = rank.shape[0]
  front_size = jax.ops.segment_sum(ok.astype(jnp.int32), rank, num_segments=n + 1)
  filled = jnp.cumsum(front_size)
  return jnp.where(filled[-1] >= k, jnp.argmax(filled >= k), n + 1)


def _associate(F, ok, rank, last, ref_dirs):
  """Every valid row's nearest reference line on the normalisation of fronts <= last.

  Returns:
    ``(niche int32 [N], perpendicular distance [N])`` (0 and 0 for invalid rows).
  """
  considered = ok & (rank <= last)
  ideal, span = _normalise_nsga3(F, considered, ok & (rank == 0))
  normalised = jnp.where(ok[:, None], (F - ideal) / span, 0)
  directions = ref_dirs.astype(F.dtype)
  directions = directions / jnp.linalg.norm(directions, axis=1, keepdims=True)
  along = normalised @ directions.T  # [N, H]
  squared = jnp.sum(normalised ** 2, axis=1, keepdims=True) - along ** 2
  distance = jnp.sqrt(jnp.maximum(squared, 0))
  niche = jnp.argmin(distance, axis=1).astype(jnp.int32)  # ties: lowest reference index
  return niche, jnp.where(ok, jnp.min(distance, axis=1), 0)


def _niching_order(rank, ok, niche, niche_distance, num_dirs: int, num_steps: int,
                   key=None) -> jax.Array:
  """NSGA-III's niche-preserving order, continued over every front.

  Step t takes, from the best front that still has unordered rows, the reference
  direction with the smallest niche count (rows already ordered, of any front) among
  the directions with candidates (lowest index on ties), and its nearest member (lowest
  row index on ties). With ``key``, direction ties are random and an occupied niche
  gives a random member (Deb & Jain); an empty one still gives its nearest.

  Args:
    rank: int32 [N] fronts; ok: bool [N] valid rows.
    niche: int32 [N] reference direction of each row; niche_distance: [N] distance.
    num_dirs: number of reference directions H.
    num_steps: how many rows to order (static; N orders every valid row).
    key: optional PRNG key.

  Returns:
    int32 [N]: the step at which each row was ordered; int32 max for rows not ordered.
  """
  n = rank.shape[0]
  big = jnp.iinfo(jnp.int32).max
  dtype = niche_distance.dtype

  def step(t, carry):
    remaining, niche_count, position, loop_key = carry
    front = jnp.min(jnp.where(remaining, rank, big))
    candidates = remaining & (rank == front)
    has_candidates = jax.ops.segment_max(candidates.astype(jnp.int32), niche,
                                         num_segments=num_dirs) > 0
    score = jnp.where(has_candidates, niche_count, big).astype(dtype)
    if key is None:
      member_score = niche_distance
    else:
      loop_key, tie_key, member_key = jax.random.split(loop_key, 3)
      score = score + 0.5 * jax.random.uniform(tie_key, (num_dirs,), dtype)
    direction = jnp.argmin(score)
    if key is not None:  # empty niche: nearest member; occupied niche: a random member
      member_score = jnp.where(niche_count[direction] == 0, niche_distance,
                               jax.random.uniform(member_key, (n,), dtype))
    in_niche = candidates & (niche == direction)
    member = jnp.argmin(jnp.where(in_niche, member_score, jnp.inf))
    active = jnp.any(in_niche)  # False once every valid row is ordered
    remaining = remaining.at[member].set(jnp.where(active, False, remaining[member]))
    niche_count = niche_count.at[direction].add(active.astype(jnp.int32))
    position = position.at[member].set(jnp.where(active, t, position[member]))
    return remaining, niche_count, position, loop_key

  loop_key = key if key is not None else jax.random.key(0)
  init = (ok, jnp.zeros(num_dirs, jnp.int32), jnp.full(n, big, jnp.int32), loop_key)
  return lax.fori_loop(0, num_steps, step, init)[2]


def _nsga3_positions(F, k, ref_dirs, valid, violation, key, num_steps):
  """Shared core of ``nsga3_priority`` / ``nsga3_select``.

  Returns:
    ``(position int32 [N] from _niching_order, rank, ok, last front)``.
  """
  F, ok, rank = _selection_ranks(F, valid, violation)
  last = _last_front(rank, ok, k)
  niche, niche_distance = _associate(F, ok, rank, last, ref_dirs)
  position = _niching_order(rank, ok, niche, niche_distance, ref_dirs.shape[0], num_steps,
                            key)
  return position, rank, ok, last


def nsga3_priority(F, k, ref_dirs, valid=None, violation=None, *, key=None) -> jax.Array:
  """NSGA-III (Deb & Jain 2014) order of every row, consistent with survival of k rows.

  Objectives are minimised. The rows with priority < k are exactly NSGA-III's k
  survivors (``nsga3_select``): rows are normalised on the fronts up to the one that
  reaches k rows (ideal point, ASF extreme points, hyperplane intercepts with a nadir
  fallback), each is associated with the reference line nearest in perpendicular
  distance, then fronts are ordered one after another; inside a front, repeatedly the
  reference direction with the smallest niche count among the directions that still
  have candidates (counting every row already ordered, whatever its front) gives its
  nearest member. Beyond the k survivors the same niching continues, so the order
  ranks every candidate (NEMO's species each keep their own best-ranked members).

  Ties are deterministic when ``key`` is None: the lowest reference index among equal
  niche counts, then the nearest member, then the lowest row index. With a ``key``,
  ties between niche counts and the member of an already occupied niche are random
  as in the paper. With ``violation``, fronts follow Deb's constraint domination
  (feasible fronts, then infeasible rows by increasing violation). Invalid rows
  (``valid`` False, a NaN objective or violation) come last, by index.

  Args:
    F: objectives [N, M], all minimised.
    k: the number of survivors the order is consistent with, 0 <= k <= N: a Python int
      or an int scalar array (may be traced, e.g. vmapped over several k).
    ref_dirs: reference directions [H, M] (e.g. ``uniform_weights``).
    valid: optional bool [N].
    violation: optional [N] total constraint violation (<= 0 feasible) or [N, C]
      constraint values ``g <= 0``.
    key: optional PRNG key for random tie-breaking.

  Returns:
    int32 [N] priority, a permutation of 0..N-1 (0 = best).
  """
  F = _as_objectives(F)
  n = F.shape[0]
  k = _check_count(k, n)
  ref_dirs = _check_ref_dirs(ref_dirs, F.shape[1])
  if n == 0:
    return jnp.zeros(0, jnp.int32)
  position, _, _, _ = _nsga3_positions(F, k, ref_dirs, valid, violation, key, n)
  index = jnp.arange(n, dtype=jnp.int32)
  _, order = lax.sort((position, index), num_keys=2)  # unordered (invalid) rows: by index
  return _inverse_permutation(order)


def nsga3_select(F, k: int, ref_dirs, valid=None, violation=None, *, key=None) -> jax.Array:
  """NSGA-III survival (Deb & Jain 2014) returning the indices of k survivors.

  Objectives are minimised. Whole fronts are taken while they fit; the front that
  overfills (the "last front") is filled by reference-point niching (see
  ``nsga3_priority``, whose k best rows these are): its rows are added one at a time
  to the reference direction with the smallest niche count that still has candidates.

  Tie-breaking is deterministic when ``key`` is None: the lowest reference index among
  equal niche counts, then the candidate nearest to that line (lowest row index on
  ties). With a ``key``, ties between niche counts and the choice of a member for a
  niche already occupied are random as in the paper.

  Args:
    F: objectives [N, M], all minimised.
    k: number of survivors (static), 0 <= k <= N.
    ref_dirs: reference directions [H, M] (e.g. ``uniform_weights``).
    valid: optional bool [N]; invalid rows are taken only after every valid row.
    violation: optional constraint violation, see ``nsga3_priority``.
    key: optional PRNG key for random tie-breaking.

  Returns:
    int32 [k] indices: taken fronts first (by rank, then index), then niching picks in
    pick order, then (only if fewer than k valid rows) invalid rows by index.
  """
  F = _as_objectives(F)
  n = F.shape[0]
  k = _check_k(k, n)
  ref_dirs = _check_ref_dirs(ref_dirs, F.shape[1])
  if k == 0:
    return jnp.zeros(0, jnp.int32)
  # k niching steps decide the survivors (the rest of the order is not needed).
  position, rank, ok, last = _nsga3_positions(F, k, ref_dirs, valid, violation, key, k)
  taken = ok & (rank < last)
  picked = ok & (rank == last) & (position < k)
  index = jnp.arange(n, dtype=jnp.int32)
  # Taken rows (by rank, index), then picks (in pick order), then the rest (valid
  # before invalid via rank, then index).
  group = jnp.where(taken, 0, jnp.where(picked, 1, 2))
  within = jnp.where(taken, rank, jnp.where(picked, position, rank))
  _, _, _, order = lax.sort((group, within, index, index), num_keys=3)
  return order[:k].astype(jnp.int32)
