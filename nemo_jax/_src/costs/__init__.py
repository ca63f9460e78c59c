"""Hardware cost models (all minimised), split by job.

* ``formulas.py``: BOPs, memory, EMOMC energy / size as pure functions of a config batch;
* ``registry.py``: named objectives (:class:`CostRegistry`, passed explicitly) and the
  jit-compiled, cached entry points;
* ``report.py``: the per-layer float64 numpy breakdown of one configuration.
"""

from nemo_jax._src.costs.formulas import (CODINGS, COST_KEYS, DATAFLOWS, check_coding,
                                          check_dataflow, cost_matrix, emomc_counts)
from nemo_jax._src.costs.registry import (BUILTIN_KEYS, CostFn, CostRegistry, compute_costs,
                                          compute_objectives, costs_jnp, emomc_energy,
                                          emomc_size_kb, make_costs_fn, make_objectives_fn,
                                          map_chunks, objectives_jnp)
from nemo_jax._src.costs.report import cost_report, layer_costs_numpy

__all__ = [
    "BUILTIN_KEYS", "CODINGS", "COST_KEYS", "CostFn", "CostRegistry", "DATAFLOWS",
    "check_coding", "check_dataflow", "compute_costs", "compute_objectives", "cost_matrix",
    "cost_report", "costs_jnp", "emomc_counts", "emomc_energy", "emomc_size_kb",
    "layer_costs_numpy", "make_costs_fn", "make_objectives_fn", "map_chunks",
    "objectives_jnp",
]
