"""The NEMO search engine: species, variation operators, GNN policies and the driver.

``search(config)`` runs a search (see :func:`nemo_jax._src.search.run.search`). The
pieces are public for researchers building their own loops: the :class:`Engine`'s
jitted ``init_state`` / ``propose`` / ``select`` functions and their typed pytrees
(:class:`SearchState`, :class:`Archive`, :class:`Batch`, :class:`Proposal`,
:class:`GenerationMetrics`), the :class:`Problem` (model + data + objectives), the
species protocol (:class:`SpeciesGroup`, :func:`ga_group`; custom kinds are passed in
``nemo_jax.Registries(species=...)``) and the operators.
"""

from nemo_jax._src.problem import Problem, build_problem
from nemo_jax._src.search.config import (DEFAULT_SPECIES, EVOSAX_OPTIMIZERS, SPECIES_KINDS,
                                         SearchConfig, SpeciesConfig, load_search_config,
                                         validate_search_config)
from nemo_jax._src.search.engine import (Archive, Batch, Engine, GenerationMetrics, Proposal,
                                         SearchState, allocate_sizes, update_archive)
from nemo_jax._src.search.operators import (decode_floor, decode_round, polynomial_mutation,
                                            sbx_crossover, ssne_crossover, ssne_mutate,
                                            tournament_select)
from nemo_jax._src.search.policies import GNNPolicy, decode_logits, gcn_policy, graph_unet_policy
from nemo_jax._src.search.report import redraw
from nemo_jax._src.search.run import SearchResult, search
from nemo_jax._src.search.species import (GroupBuilder, SearchSpace, SpeciesGroup, TellInfo,
                                          ga_group, keep_best)

__all__ = [
    "Archive", "Batch", "DEFAULT_SPECIES", "EVOSAX_OPTIMIZERS", "Engine", "GNNPolicy",
    "GenerationMetrics", "GroupBuilder", "Problem", "Proposal", "SPECIES_KINDS",
    "SearchConfig", "SearchResult", "SearchSpace", "SearchState", "SpeciesConfig",
    "SpeciesGroup", "TellInfo", "allocate_sizes", "build_problem", "decode_floor",
    "decode_logits", "decode_round", "ga_group", "gcn_policy", "graph_unet_policy",
    "keep_best", "load_search_config", "polynomial_mutation", "redraw", "sbx_crossover",
    "search", "ssne_crossover", "ssne_mutate", "tournament_select", "update_archive",
    "validate_search_config",
]
