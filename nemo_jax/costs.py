"""Workload extraction, the quantizer graph, and vectorised cost models (all minimised).

User costs go into an explicit registry, passed to the search::

    registries = nemo_jax.Registries().with_cost("latency", latency_fn)
    nemo_jax.search(config, registries=registries)

or are named in a config file as ``"custom_costs": {"latency": "my_pkg.mod:latency_fn"}``.
"""

from nemo_jax._src.costs import (BUILTIN_KEYS, CODINGS, COST_KEYS, DATAFLOWS, CostRegistry,
                                 compute_costs, compute_objectives, cost_report, emomc_energy,
                                 emomc_size_kb, layer_costs_numpy, make_objectives_fn)
from nemo_jax._src.graph import (ALL_FEATURE_NAMES, FEATURE_NAMES, feature_names,
                                 node_features, workload_graph)
from nemo_jax._src.spec import PLACEMENTS
from nemo_jax._src.workload import (KIND_ACTIVATION, KIND_WEIGHT, Workload, extract_workload,
                                    nodes_to_config_index, workload_to_json)

__all__ = [
    "ALL_FEATURE_NAMES", "KIND_ACTIVATION", "KIND_WEIGHT", "PLACEMENTS", "feature_names", "BUILTIN_KEYS", "CODINGS", "COST_KEYS", "CostRegistry", "DATAFLOWS", "FEATURE_NAMES",
    "Workload", "compute_costs", "compute_objectives", "cost_report", "emomc_energy", "layer_costs_numpy",
    "emomc_size_kb", "extract_workload", "make_objectives_fn",
    "node_features", "nodes_to_config_index", "workload_graph",
    "workload_to_json",
]
