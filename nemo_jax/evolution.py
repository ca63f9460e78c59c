"""The NEMO search engine: species, variation operators, GNN policies and the driver.

``search(config)`` runs a search (see :func:`nemo_jax._src.search.run.search`). The
pieces are public for researchers building their own loops: the :class:`Engine`'s
jitted ``init_state`` / ``propose`` / ``select`` functions, the :class:`Problem`
(model + data + objectives), the species builders and the operators.
"""

from nemo_jax._src.problem import Problem, SearchSpace, build_problem
from nemo_jax._src.search.config import (DEFAULT_SPECIES, EVOSAX_OPTIMIZERS, SPECIES_KINDS,
                                         SearchConfig, SpeciesConfig, load_search_config,
                                         validate_search_config)
from nemo_jax._src.search.engine import Engine, allocate_sizes, joint_priority, update_archive
from nemo_jax._src.search.operators import (decode_floor, decode_round, polynomial_mutation,
                                            sbx_crossover, ssne_crossover, ssne_mutate,
                                            tournament_select)
from nemo_jax._src.search.policies import GNNPolicy, decode_logits, gcn_policy, graph_unet_policy
from nemo_jax._src.search.report import redraw
from nemo_jax._src.search.run import SearchResult, search
from nemo_jax._src.search.species import Group, register_species

__all__ = [
    "DEFAULT_SPECIES", "EVOSAX_OPTIMIZERS", "Engine", "GNNPolicy", "Group", "Problem",
    "SPECIES_KINDS", "SearchConfig", "SearchResult", "SearchSpace", "SpeciesConfig",
    "allocate_sizes", "build_problem", "decode_floor", "decode_logits", "decode_round",
    "gcn_policy", "graph_unet_policy", "joint_priority",
    "load_search_config", "polynomial_mutation", "redraw", "register_species",
    "sbx_crossover", "search", "ssne_crossover", "ssne_mutate", "tournament_select",
    "update_archive", "validate_search_config",
]
