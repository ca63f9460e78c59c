"""The NEMO search engine: species, variation operators, GNN policies and the driver.

``search(config)`` runs a search (see :func:`nemo_jax._src.run.search.search`). The
pieces are public for researchers building their own loops: the :class:`Engine`'s
jitted ``init_state`` / ``propose`` / ``select`` functions and their typed pytrees
(:class:`SearchState`, :class:`Archive`, :class:`Batch`, :class:`Proposal`,
:class:`GenerationMetrics`), the :class:`Problem` (model + data + objectives), the
species protocol (:class:`SpeciesGroup`, :func:`ga_group`; custom kinds are passed in
``nemo_jax.Registries().with_species(...)``) and the operators.
"""

from nemo_jax._src.problem import Problem, SearchSpace
from nemo_jax._src.run.config import SearchConfig, load_search_config, validate_search_config
from nemo_jax._src.run.report import redraw
from nemo_jax._src.run.search import SearchResult, build_problem, make_engine, search
from nemo_jax._src.search.config import (EVOSAX_OPTIMIZERS, DirectParams, EvolutionConfig,
                                         GNNParams, GraphUNetParams, SpeciesConfig,
                                         SpeciesKind)
from nemo_jax._src.search.engine import (Archive, Batch, Engine, GenerationMetrics, Proposal,
                                         SearchState, allocate_sizes, update_archive)
from nemo_jax._src.search.operators import (decode_floor, decode_round, polynomial_mutation,
                                            sbx_crossover, ssne_crossover, ssne_mutate,
                                            tournament_select)
from nemo_jax._src.search.policies import GNNPolicy, decode_logits, gcn_policy, graph_unet_policy
from nemo_jax._src.search.species import (BUILTIN_SPECIES, GroupBuilder, SpeciesGroup, TellInfo,
                                          ga_group, keep_best)

__all__ = [
    "Archive", "BUILTIN_SPECIES", "Batch", "DirectParams", "EVOSAX_OPTIMIZERS", "Engine",
    "EvolutionConfig", "GNNParams", "GNNPolicy", "GenerationMetrics", "GraphUNetParams",
    "GroupBuilder", "Problem", "Proposal", "SearchConfig", "SearchResult", "SearchSpace",
    "SearchState", "SpeciesConfig", "SpeciesGroup", "SpeciesKind", "TellInfo",
    "allocate_sizes", "build_problem", "decode_floor", "decode_logits", "decode_round",
    "ga_group", "gcn_policy", "graph_unet_policy", "keep_best", "load_search_config",
    "make_engine", "polynomial_mutation", "redraw", "sbx_crossover", "search",
    "ssne_crossover", "ssne_mutate", "tournament_select", "update_archive",
    "validate_search_config",
]
