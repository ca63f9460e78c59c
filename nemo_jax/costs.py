"""Workload extraction, the quantizer graph, and vectorised cost models (all minimised)."""

from nemo_jax._src.costs import (CODINGS, DATAFLOWS, available_objectives, compute_costs,
                                 compute_objectives, cost_report, emomc_energy, emomc_size_kb,
                                 make_objectives_fn, register_cost, unregister_cost)
from nemo_jax._src.graph import node_features, workload_graph
from nemo_jax._src.workload import (Workload, extract_workload, merge_node_bits,
                                    nodes_to_config_index, split_node_bits, workload_to_json)

__all__ = [
    "CODINGS", "DATAFLOWS", "Workload", "available_objectives", "compute_costs",
    "compute_objectives", "cost_report", "emomc_energy", "emomc_size_kb", "extract_workload",
    "make_objectives_fn", "merge_node_bits", "node_features", "nodes_to_config_index",
    "register_cost", "split_node_bits", "unregister_cost", "workload_graph", "workload_to_json",
]
