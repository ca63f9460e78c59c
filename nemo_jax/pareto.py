"""Multi-objective (Pareto) toolkit in JAX; every objective is MINIMISED.

``F`` is an array ``[N individuals, M objectives]`` (accuracy enters as error). All
functions are pure, jit- and vmap-compatible (e.g. vmapped per species) with static
output shapes, and take an optional ``valid`` bool mask ``[N]``: rows marked False or
containing a NaN never dominate, rank last, get crowding 0, are selected only after
every valid row and add nothing to hypervolume or R2.

- ``nondominated_rank(F, valid=None)``: front index per row (0 = first front).
- ``nondominated_mask(F, valid=None)``: first front as a bool mask.
- ``constrained_rank(F, violation, valid=None)``: Deb's constraint domination.
- ``crowding_distance(F, rank=None, valid=None)``: NSGA-II crowding distance.
- ``hypervolume(F, ref, valid=None)``: exact (M = 2, 3 fast; M >= 4 O(N^(M-1))).
- ``hypervolume_contributions(F, ref, valid=None)``: exclusive contributions.
- ``hypervolume_monte_carlo(F, ref, key, ...)``: estimate for many objectives.
- ``r2_indicator(F, utopia, weights, valid=None)``: Tchebycheff R2 (lower is better).
- ``uniform_weights(n_obj, n_partitions)``: Das-Dennis weights / reference directions.
- ``nsga2_priority(F, valid=None, violation=None)``, ``nsga3_priority(F, k, ref_dirs,
  valid=None, violation=None)``: a total order of all rows (0 = best) whose k best rows
  are the NSGA-II / NSGA-III survivors.
- ``nsga2_select(F, k, valid=None)``, ``nsga3_select(F, k, ref_dirs, valid=None)``:
  indices of the k survivors.
"""

from __future__ import annotations

from nemo_jax._src.pareto import DEFAULT_BLOCK_SIZE
from nemo_jax._src.pareto import constrained_rank
from nemo_jax._src.pareto import crowding_distance
from nemo_jax._src.pareto import hypervolume
from nemo_jax._src.pareto import hypervolume_contributions
from nemo_jax._src.pareto import hypervolume_monte_carlo
from nemo_jax._src.pareto import nondominated_mask
from nemo_jax._src.pareto import nondominated_rank
from nemo_jax._src.pareto import nsga2_priority
from nemo_jax._src.pareto import nsga2_select
from nemo_jax._src.pareto import nsga3_priority
from nemo_jax._src.pareto import nsga3_select
from nemo_jax._src.pareto import r2_indicator
from nemo_jax._src.pareto import uniform_weights

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "constrained_rank",
    "crowding_distance",
    "hypervolume",
    "hypervolume_contributions",
    "hypervolume_monte_carlo",
    "nondominated_mask",
    "nondominated_rank",
    "nsga2_priority",
    "nsga2_select",
    "nsga3_priority",
    "nsga3_select",
    "r2_indicator",
    "uniform_weights",
]
