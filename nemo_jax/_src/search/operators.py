"""Evolutionary variation and selection operators of the NEMO species (pure JAX).

Direct-search species (genes = one real per quantizer in ``[low, high]``):

* :func:`sbx_crossover` - bounded simulated binary crossover (Deb & Agrawal 1995), a
  line-by-line port of ``realcross`` in Deb's NSGA-II reference C code (nsga2-gnu, also
  what pymoo's ``cross_sbx`` computes).
* :func:`polynomial_mutation` - Deb's bounded ("highly disruptive") polynomial mutation,
  a port of ``real_mutate_ind`` in the same code (pymoo's ``mut_pm``).
* :func:`decode_round` / :func:`decode_floor` - genes -> integer bit-widths.

Both stochastic operators come in two layers: ``*_from_uniforms`` takes every uniform
random number explicitly (so a numpy transcription of the C code fed the same numbers
must agree, see the tests), and the keyed wrapper draws them from a PRNG key. All work
on ``[..., G]`` arrays (a population ``[P, G]`` or a single genome ``[G]``), return
values inside ``[low, high]`` and are jit/vmap compatible.

GNN species (genome = a policy's parameter pytree, see ``policies.py``):

* :func:`ssne_mutate` / :func:`ssne_crossover` - SSNE operators of ERL/CERL (Khadka &
  Tumer 2018; Khadka et al. 2019) as NEMO uses them: mutation perturbs ONE randomly
  chosen layer per member; crossover swaps (or averages) whole layers. They act on one
  member; vmap them (or use the ``*_population`` wrappers) over a population axis.

Selection: :func:`tournament_select` (lower rank is better: everything is minimised).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nemo_jax._src.search.policies import param_layers

SBX_EPS = 1.0e-14
"""Parents closer than this in a gene are not crossed in that gene (Deb's ``EPS``)."""

GRANULARITIES = ("leaf", "layer")
CROSSOVER_MODES = ("swap", "average")


def _check_probability(name: str, value: Any) -> None:
  """Validate a Python-number probability (traced values are not checked)."""
  if isinstance(value, (int, float)) and not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _check_eta(name: str, value: Any) -> None:
  if isinstance(value, (int, float)) and not float(value) >= 0.0:
    raise ValueError(f"{name} (distribution index) must be >= 0, got {value!r}")


# --------------------------------------------------------------------------------------
# Direct-search species: SBX, polynomial mutation, decoders
# --------------------------------------------------------------------------------------


def sbx_from_uniforms(parents_a: jax.Array, parents_b: jax.Array, low, high,
                      u_pair: jax.Array, u_var: jax.Array, u_beta: jax.Array,
                      u_swap: jax.Array, eta=15.0, prob=0.9, prob_var=0.5):
  """Bounded SBX with all random numbers given (Deb's ``realcross``).

  For each pair (row): crossover happens iff ``u_pair <= prob``; then for each gene iff
  ``u_var <= prob_var``, the parents differ by more than :data:`SBX_EPS` and
  ``high > low``. With ``y1 <= y2`` the parents' gene values and ``u = u_beta``::

    beta = 1 + 2 (y1 - low) / (y2 - y1);  alpha = 2 - beta^-(eta+1)
    betaq = (u alpha)^(1/(eta+1))            if u <= 1/alpha
          = (1 / (2 - u alpha))^(1/(eta+1))  otherwise
    c1 = 0.5 ((y1 + y2) - betaq (y2 - y1))
    (the same with beta = 1 + 2 (high - y2) / (y2 - y1) gives c2 with "+")

  both clipped to ``[low, high]``; child_a gets c2 and child_b c1 iff ``u_swap <= 0.5``,
  else child_a = c1, child_b = c2. Genes not crossed copy their parent.

  Args:
    parents_a, parents_b: ``[..., G]`` genes within ``[low, high]`` (clipped into it).
    low, high: bounds broadcastable to ``[G]``.
    u_pair: uniforms ``[...]`` (one per pair).
    u_var, u_beta, u_swap: uniforms ``[..., G]``.
    eta: distribution index (larger: children closer to parents).
    prob: per-pair crossover probability.
    prob_var: per-gene crossover probability.

  Returns:
    ``(children_a, children_b)``, each like ``parents_a``, within ``[low, high]``.
  """
  dtype = jnp.result_type(parents_a, jnp.float32)
  low = jnp.asarray(low, dtype)
  high = jnp.asarray(high, dtype)
  parents_a = jnp.clip(jnp.asarray(parents_a, dtype), low, high)
  parents_b = jnp.clip(jnp.asarray(parents_b, dtype), low, high)
  eta = jnp.asarray(eta, dtype)
  cross = ((jnp.asarray(u_var) <= prob_var)
           & (jnp.asarray(u_pair) <= prob)[..., None]
           & (jnp.abs(parents_a - parents_b) > SBX_EPS)
           & (high > low))
  y1 = jnp.minimum(parents_a, parents_b)
  y2 = jnp.maximum(parents_a, parents_b)
  # Genes that are not crossed get a harmless spread so no division by zero is traced.
  spread = jnp.where(cross, y2 - y1, 1.0)
  exponent = 1.0 / (eta + 1.0)

  def spread_factor(beta):
    # beta >= 1 for genes within bounds; the max only guards against rounding.
    alpha = 2.0 - jnp.maximum(beta, 1.0) ** (-(eta + 1.0))
    inside = u_beta * alpha
    return jnp.where(u_beta <= 1.0 / alpha, inside ** exponent,
                     (1.0 / (2.0 - inside)) ** exponent)

  midpoint = y1 + y2
  child_low = 0.5 * (midpoint - spread_factor(1.0 + 2.0 * (y1 - low) / spread) * spread)
  child_high = 0.5 * (midpoint + spread_factor(1.0 + 2.0 * (high - y2) / spread) * spread)
  child_low = jnp.clip(child_low, low, high)
  child_high = jnp.clip(child_high, low, high)
  swap = jnp.asarray(u_swap) <= 0.5
  children_a = jnp.where(cross, jnp.where(swap, child_high, child_low), parents_a)
  children_b = jnp.where(cross, jnp.where(swap, child_low, child_high), parents_b)
  return children_a, children_b


def sbx_crossover(key: jax.Array, parents_a: jax.Array, parents_b: jax.Array, low, high,
                  eta=15.0, prob=0.9, prob_var=0.5):
  """Bounded simulated binary crossover (Deb & Agrawal; NSGA-II reference code).

  Args:
    key: PRNG key.
    parents_a, parents_b: ``[P, G]`` (or any ``[..., G]``) genes within ``[low, high]``;
      row i of each is one mating pair.
    low, high: gene bounds, scalars or ``[G]``.
    eta: distribution index (EMOMC's reference code: 15).
    prob: per-pair crossover probability (0.9).
    prob_var: per-gene crossover probability (0.5).

  Returns:
    ``(children_a, children_b)``, each ``[P, G]``, within ``[low, high]``.
  """
  _check_probability("prob", prob)
  _check_probability("prob_var", prob_var)
  _check_eta("eta", eta)
  parents_a = jnp.asarray(parents_a)
  if jnp.shape(parents_b) != parents_a.shape:
    raise ValueError(f"parents_b shape {jnp.shape(parents_b)} must equal parents_a shape "
                     f"{parents_a.shape}")
  if parents_a.ndim < 1:
    raise ValueError(f"parents must be [..., G] arrays, got shape {parents_a.shape}")
  key_pair, key_gene = jax.random.split(key)
  shape = parents_a.shape
  u_var, u_beta, u_swap = jax.random.uniform(key_gene, (3,) + shape)
  return sbx_from_uniforms(parents_a, parents_b, low, high,
                           jax.random.uniform(key_pair, shape[:-1]), u_var, u_beta, u_swap,
                           eta=eta, prob=prob, prob_var=prob_var)


def polynomial_mutation_from_uniforms(x: jax.Array, low, high, u_mutate: jax.Array,
                                      u_delta: jax.Array, eta=20.0, prob=None):
  """Bounded polynomial mutation with the random numbers given (Deb's ``real_mutate_ind``).

  A gene mutates iff ``u_mutate <= prob`` (and ``high > low``). With
  ``d1 = (x - low) / (high - low)``, ``d2 = (high - x) / (high - low)``, ``u = u_delta``::

    u <= 0.5: dq = (2u + (1 - 2u) (1 - d1)^(eta+1))^(1/(eta+1)) - 1
    u >  0.5: dq = 1 - (2(1 - u) + 2(u - 0.5) (1 - d2)^(eta+1))^(1/(eta+1))
    x' = clip(x + dq (high - low), low, high)

  Args:
    x: ``[..., G]`` genes within ``[low, high]`` (clipped into it).
    low, high: bounds broadcastable to ``[G]``.
    u_mutate, u_delta: uniforms like ``x``.
    eta: distribution index (EMOMC's reference code: 20).
    prob: per-gene mutation probability; ``None`` means ``1 / G``.

  Returns:
    mutated genes like ``x``, within ``[low, high]``.
  """
  dtype = jnp.result_type(x, jnp.float32)
  low = jnp.asarray(low, dtype)
  high = jnp.asarray(high, dtype)
  x = jnp.clip(jnp.asarray(x, dtype), low, high)
  if prob is None:
    prob = 1.0 / x.shape[-1]
  eta = jnp.asarray(eta, dtype)
  mutate = (jnp.asarray(u_mutate) <= prob) & (high > low)
  span = jnp.where(high > low, high - low, 1.0)
  delta_low = (x - low) / span
  delta_high = (high - x) / span
  exponent = 1.0 / (eta + 1.0)
  u = jnp.asarray(u_delta, dtype)
  value_low = 2.0 * u + (1.0 - 2.0 * u) * jnp.clip(1.0 - delta_low, 0.0, 1.0) ** (eta + 1.0)
  value_high = (2.0 * (1.0 - u)
                + 2.0 * (u - 0.5) * jnp.clip(1.0 - delta_high, 0.0, 1.0) ** (eta + 1.0))
  delta_q = jnp.where(u <= 0.5,
                      jnp.maximum(value_low, 0.0) ** exponent - 1.0,
                      1.0 - jnp.maximum(value_high, 0.0) ** exponent)
  mutated = jnp.clip(x + delta_q * span, low, high)
  return jnp.where(mutate, mutated, x)


def polynomial_mutation(key: jax.Array, x: jax.Array, low, high, eta=20.0, prob=None):
  """Bounded polynomial mutation (Deb; NSGA-II reference code / pymoo ``mut_pm``).

  Args:
    key: PRNG key.
    x: ``[P, G]`` (or ``[..., G]``) genes within ``[low, high]``.
    low, high: gene bounds, scalars or ``[G]``.
    eta: distribution index (20).
    prob: per-gene mutation probability; ``None`` means ``1 / G``.

  Returns:
    mutated genes like ``x``, within ``[low, high]``.
  """
  if prob is not None:
    _check_probability("prob", prob)
  _check_eta("eta", eta)
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"x must be a [..., G] array, got shape {x.shape}")
  u_mutate, u_delta = jax.random.uniform(key, (2,) + x.shape)
  return polynomial_mutation_from_uniforms(x, low, high, u_mutate, u_delta, eta=eta, prob=prob)


def _check_bit_range(choices_low, choices_high) -> None:
  if isinstance(choices_low, int) and isinstance(choices_high, int) and choices_low > choices_high:
    raise ValueError(f"choices_low ({choices_low}) must be <= choices_high ({choices_high})")


def decode_round(genes: jax.Array, choices_low=2, choices_high=8) -> jax.Array:
  """Genes -> bit-widths by rounding to the nearest integer (halves round up).

  ``clip(floor(g + 0.5), choices_low, choices_high)``. With genes in ``[2, 8]`` the end
  values 2 and 8 own half-width intervals; widen the gene bounds to ``[1.5, 8.5]`` for
  equal shares.

  Args:
    genes: ``[..., G]`` real genes.
    choices_low, choices_high: smallest and largest bit-width.

  Returns:
    int32 bit-widths like ``genes``.
  """
  _check_bit_range(choices_low, choices_high)
  bits = jnp.floor(jnp.asarray(genes, jnp.float32) + 0.5)
  return jnp.clip(bits, choices_low, choices_high).astype(jnp.int32)


def decode_floor(genes: jax.Array, choices_low=2, choices_high=8) -> jax.Array:
  """Genes -> bit-widths by flooring (NEMO's compression-biased species).

  ``clip(floor(g), choices_low, choices_high)``: a gene equal to ``choices_high`` (the
  upper bound, reached by clipping in SBX / mutation) maps to ``choices_high``; genes in
  ``[b, b + 1)`` map to ``b``.

  Args:
    genes: ``[..., G]`` real genes.
    choices_low, choices_high: smallest and largest bit-width.

  Returns:
    int32 bit-widths like ``genes``.
  """
  _check_bit_range(choices_low, choices_high)
  bits = jnp.floor(jnp.asarray(genes, jnp.float32))
  return jnp.clip(bits, choices_low, choices_high).astype(jnp.int32)


# --------------------------------------------------------------------------------------
# GNN species: SSNE operators over parameter pytrees
# --------------------------------------------------------------------------------------


def layer_ids(params: Any, granularity: str = "leaf") -> tuple[tuple[int, ...], int]:
  """Which SSNE unit each leaf of ``params`` belongs to.

  Args:
    params: parameter pytree (one member or a population; only the structure is used).
    granularity: "leaf" - every tensor is its own unit (NEMO's "per tensor"); "layer" -
      tensors are grouped by :func:`policies.param_layers` (weights and bias together).

  Returns:
    ``(unit_of_leaf, num_units)`` with ``unit_of_leaf[i]`` for leaf i in
    ``tree_leaves`` order.
  """
  num_leaves = len(jax.tree_util.tree_leaves(params))
  if granularity == "leaf":
    return tuple(range(num_leaves)), num_leaves
  if granularity == "layer":
    unit_of_leaf = [0] * num_leaves
    layers = param_layers(params)
    for unit, (_, leaf_indices, _) in enumerate(layers):
      for leaf_index in leaf_indices:
        unit_of_leaf[leaf_index] = unit
    return tuple(unit_of_leaf), len(layers)
  raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def ssne_mutate(key: jax.Array, params: Any, mut_prob=0.9, mut_strength=0.1,
                super_mut_prob=0.05, super_mut_strength=10.0, reset_prob=0.05,
                mut_frac=0.1, reset_std=1.0, weight_limit=1.0e6,
                granularity: str = "leaf") -> Any:
  """SSNE mutation of ONE member: perturb one randomly chosen layer (ERL's operator).

  With probability ``mut_prob`` one unit (a tensor, or a layer with
  ``granularity="layer"``) is chosen uniformly; each of its weights is selected with
  probability ``mut_frac`` (ERL mutates up to ``ceil(0.1 n)`` random weights of a
  tensor; 1.0 perturbs the whole tensor) and, drawing ``r ~ U[0, 1)``:

  * ``r < super_mut_prob``: super mutation ``w += N(0, (super_mut_strength |w|)^2)``;
  * ``r < super_mut_prob + reset_prob``: reset ``w = N(0, reset_std^2)``;
  * otherwise: ``w += N(0, (mut_strength |w|)^2)``;

  then clipped to ``[-weight_limit, weight_limit]`` (ERL's hard limit). Noise is
  proportional to ``|w|``, so zero weights (initial biases) move only by resets.
  Shapes are static: the unit is picked with a random index and applied as a mask.

  Args:
    key: PRNG key.
    params: one member's parameter pytree (vmap for a population).
    mut_prob: probability that the member is mutated at all.
    mut_strength: relative std of the regular mutation.
    super_mut_prob: per-weight probability of a super mutation.
    super_mut_strength: relative std of the super mutation.
    reset_prob: per-weight probability of a reset.
    mut_frac: per-weight probability of being touched within the chosen unit.
    reset_std: std of reset values.
    weight_limit: absolute bound on mutated weights.
    granularity: "leaf" or "layer" (:func:`layer_ids`).

  Returns:
    mutated params, same structure, shapes and dtypes.
  """
  for name, value in (("mut_prob", mut_prob), ("super_mut_prob", super_mut_prob),
                      ("reset_prob", reset_prob), ("mut_frac", mut_frac)):
    _check_probability(name, value)
  if (isinstance(super_mut_prob, (int, float)) and isinstance(reset_prob, (int, float))
      and super_mut_prob + reset_prob > 1.0):
    raise ValueError(f"super_mut_prob + reset_prob must be <= 1, got "
                     f"{super_mut_prob} + {reset_prob}")
  unit_of_leaf, num_units = layer_ids(params, granularity)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  sizes = [int(jnp.size(leaf)) for leaf in leaves]
  total = sum(sizes)
  # Few, large random draws (XLA compiles each PRNG call separately and slowly on CPU);
  # leaf i uses the slice [offset_i, offset_i + size_i) of each.
  key_member, key_uniform, key_normal = jax.random.split(key, 3)
  member_draw = jax.random.uniform(key_member, (2,))
  do_mutate = member_draw[0] < mut_prob
  chosen_unit = jnp.minimum(jnp.floor(member_draw[1] * num_units).astype(jnp.int32),
                            num_units - 1)
  uniforms = jax.random.uniform(key_uniform, (2, total))  # [select, kind]
  normals = jax.random.normal(key_normal, (2, total))  # [noise, reset value]
  new_leaves, offset = [], 0
  for leaf_index, (leaf, size) in enumerate(zip(leaves, sizes)):
    shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
    select_draw, kind = (uniforms[row, offset:offset + size].reshape(shape) for row in range(2))
    noise, reset = (normals[row, offset:offset + size].reshape(shape).astype(dtype)
                    for row in range(2))
    offset += size
    selected = (select_draw < mut_frac) & do_mutate & (chosen_unit == unit_of_leaf[leaf_index])
    magnitude = jnp.abs(leaf)
    super_mutated = leaf + noise * (super_mut_strength * magnitude)
    regular = leaf + noise * (mut_strength * magnitude)
    mutated = jnp.where(kind < super_mut_prob, super_mutated,
                        jnp.where(kind < super_mut_prob + reset_prob, reset * reset_std, regular))
    mutated = jnp.clip(mutated, -weight_limit, weight_limit).astype(dtype)
    new_leaves.append(jnp.where(selected, mutated, leaf))
  return jax.tree_util.tree_unflatten(treedef, new_leaves)


def ssne_crossover(key: jax.Array, params_a: Any, params_b: Any, mode: str = "swap",
                   swap_prob=0.5, granularity: str = "leaf"):
  """SSNE layer-wise crossover of two members: whole layers are swapped or averaged.

  Each unit (tensor, or layer with ``granularity="layer"``) is chosen independently with
  probability ``swap_prob``. ``mode="swap"``: chosen units are exchanged, so every unit
  of each child is a verbatim copy of one parent's and the two children are
  complementary. ``mode="average"``: chosen units become ``(a + b) / 2`` in both
  children; the others stay with their own parent.

  Args:
    key: PRNG key.
    params_a, params_b: two members' parameter pytrees of the same structure.
    mode: "swap" or "average".
    swap_prob: per-unit probability of being exchanged / averaged.
    granularity: "leaf" or "layer".

  Returns:
    ``(child_a, child_b)`` pytrees like ``params_a``.
  """
  if mode not in CROSSOVER_MODES:
    raise ValueError(f"mode must be one of {CROSSOVER_MODES}, got {mode!r}")
  _check_probability("swap_prob", swap_prob)
  if jax.tree_util.tree_structure(params_a) != jax.tree_util.tree_structure(params_b):
    raise ValueError("params_a and params_b must have the same pytree structure")
  unit_of_leaf, num_units = layer_ids(params_a, granularity)
  chosen = jax.random.uniform(key, (num_units,)) < swap_prob
  leaves_a, treedef = jax.tree_util.tree_flatten(params_a)
  leaves_b = jax.tree_util.tree_leaves(params_b)
  children_a, children_b = [], []
  for leaf_index, (leaf_a, leaf_b) in enumerate(zip(leaves_a, leaves_b)):
    take = chosen[unit_of_leaf[leaf_index]]
    if mode == "swap":
      children_a.append(jnp.where(take, leaf_b, leaf_a))
      children_b.append(jnp.where(take, leaf_a, leaf_b))
    else:
      mean = ((leaf_a + leaf_b) / 2).astype(jnp.result_type(leaf_a))
      children_a.append(jnp.where(take, mean, leaf_a))
      children_b.append(jnp.where(take, mean, leaf_b))
  return (jax.tree_util.tree_unflatten(treedef, children_a),
          jax.tree_util.tree_unflatten(treedef, children_b))


def _population_size(population: Any) -> int:
  leaves = jax.tree_util.tree_leaves(population)
  if not leaves or jnp.ndim(leaves[0]) < 1:
    raise ValueError("population must be a non-empty pytree with a leading member axis")
  return jnp.shape(leaves[0])[0]


def ssne_mutate_population(key: jax.Array, population: Any, **kwargs) -> Any:
  """:func:`ssne_mutate` applied independently to every member (leading axis)."""
  keys = jax.random.split(key, _population_size(population))
  return jax.vmap(lambda k, p: ssne_mutate(k, p, **kwargs))(keys, population)


def ssne_crossover_population(key: jax.Array, population_a: Any, population_b: Any,
                              **kwargs):
  """:func:`ssne_crossover` of member i of ``population_a`` with member i of ``_b``."""
  keys = jax.random.split(key, _population_size(population_a))
  return jax.vmap(lambda k, a, b: ssne_crossover(k, a, b, **kwargs))(
      keys, population_a, population_b)


# --------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------


def tournament_select(key: jax.Array, fitness_rank: jax.Array, k: int,
                      tournament_size: int = 2, tie_break: jax.Array | None = None,
                      valid: jax.Array | None = None) -> jax.Array:
  """Tournament selection; LOWER ``fitness_rank`` wins (everything is minimised).

  Each of the ``k`` tournaments draws ``tournament_size`` contestants uniformly with
  replacement (among ``valid`` members if given, for padded populations) and returns the
  one with the lowest rank; among equal ranks the lowest ``tie_break`` wins (e.g. minus
  the crowding distance), then the first drawn.

  Args:
    key: PRNG key.
    fitness_rank: ``[P]`` ranks or scalar fitness, lower is better.
    k: number of winners (static int).
    tournament_size: contestants per tournament (static int >= 1).
    tie_break: optional ``[P]``, lower is better, used only among equal ranks.
    valid: optional bool ``[P]``; at least one member must be valid.

  Returns:
    int32 ``[k]`` indices into the population.
  """
  if not isinstance(k, int) or k < 0:
    raise ValueError(f"k must be an int >= 0, got {k!r}")
  if not isinstance(tournament_size, int) or tournament_size < 1:
    raise ValueError(f"tournament_size must be an int >= 1, got {tournament_size!r}")
  fitness_rank = jnp.asarray(fitness_rank)
  if fitness_rank.ndim != 1:
    raise ValueError(f"fitness_rank must be 1-D [P], got shape {fitness_rank.shape}")
  population_size = fitness_rank.shape[0]
  if valid is None:
    logits = jnp.zeros((population_size,), jnp.float32)
  else:
    logits = jnp.where(jnp.asarray(valid, bool), 0.0, -jnp.inf)
  contestants = jax.random.categorical(key, logits, shape=(k, tournament_size))
  ranks = fitness_rank[contestants]
  if tie_break is None:
    winner = jnp.argmin(ranks, axis=1)  # first drawn among equal ranks
  else:
    # Stable lexicographic order (rank first, then tie_break, then draw order).
    winner = jnp.lexsort((jnp.asarray(tie_break)[contestants], ranks), axis=1)[:, 0]
  return jnp.take_along_axis(contestants, winner[:, None], axis=1)[:, 0].astype(jnp.int32)
