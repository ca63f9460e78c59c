"""nemo_jax: JAX search for Pareto-optimal mixed-precision quantization and pruning.

Everything the search optimises is MINIMISED (accuracy enters as error).

Public modules:

* ``nemo_jax.models``: the quantization-aware Flax model zoo, ``QContext`` and layers.
* ``nemo_jax.quant``: fake quantizers and magnitude pruning (bits as traced arrays).
* ``nemo_jax.data``: local datasets (embedded Fashion-MNIST, IDX, CIFAR-10, ImageNet).
* ``nemo_jax.costs``: workload extraction, the GNN graph and vectorised cost models.
* ``nemo_jax.evaluation``: calibration, quantization schemes, the population evaluator.
* ``nemo_jax.pareto``: non-dominated ranking, crowding, hypervolume, R2, NSGA-II/III.
* ``nemo_jax.evolution``: the NEMO engine, species, operators and GNN policies.
* ``nemo_jax.emomc``: EMOMC's pruned-model library and results table.
* ``nemo_jax.export``: one configuration as packed integers (``.npz``) or ONNX QDQ.

Top level: :func:`search` runs a search; :func:`finetune_members` fine-tunes chosen
front members of a run (quantization-aware); :class:`QuantConfig` is the config pytree;
:class:`Registries` carries user costs and species; ``docs/DESIGN.md`` in the
repository describes the data flow and the contracts between the stages.
"""

__version__ = "0.1.0"

from nemo_jax._src.config import QuantConfig, config_from_dict, config_to_dict, load_config
from nemo_jax._src.config_file import load_config_file
from nemo_jax._src.config_file import parse_variant as parse_config_variant
from nemo_jax._src.problem import Problem, build_problem
from nemo_jax._src.finetune import FinetuneConfig, finetune_members
from nemo_jax._src.registries import Registries
from nemo_jax._src.search.config import SearchConfig, SpeciesConfig, load_search_config
from nemo_jax._src.search.report import front_table, redraw
from nemo_jax._src.search.run import SearchResult, front_hypervolume, front_objectives, search

__all__ = [
    "FinetuneConfig", "Problem", "QuantConfig", "Registries", "SearchConfig", "SearchResult", "SpeciesConfig",
    "build_problem", "config_from_dict", "finetune_members", "config_to_dict", "front_hypervolume", "front_objectives", "front_table", "load_config", "load_config_file",
    "parse_config_variant",
    "load_search_config", "redraw", "search",
]
