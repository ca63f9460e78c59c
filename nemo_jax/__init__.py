"""nemo_jax: JAX search for Pareto-optimal mixed-precision quantization and pruning.

Everything the search optimises is MINIMISED (accuracy enters as error).

Public modules:

* ``nemo_jax.models``: the quantization-aware Flax model zoo, ``QContext`` and layers.
* ``nemo_jax.quant``: fake quantizers and magnitude pruning (bits as traced arrays).
* ``nemo_jax.data``: local datasets (embedded Fashion-MNIST, IDX, CIFAR-10, ImageNet).
* ``nemo_jax.costs``: workload extraction, the GNN graph and vectorised cost models.
* ``nemo_jax.evaluation``: calibration and batched population evaluation.
* ``nemo_jax.pareto``: non-dominated ranking, crowding, hypervolume, R2, NSGA-II/III.
* ``nemo_jax.evolution``: the NEMO engine, species, operators and GNN policies.

Top level: :func:`search` runs a search; :class:`QuantConfig` is the config pytree.
"""

__version__ = "0.1.0"

from nemo_jax._src.config import QuantConfig, config_from_dict, config_to_dict, load_config
from nemo_jax._src.search.config import SearchConfig, SpeciesConfig, load_search_config
from nemo_jax._src.search.run import SearchResult, search

__all__ = [
    "QuantConfig", "SearchConfig", "SearchResult", "SpeciesConfig", "config_from_dict",
    "config_to_dict", "load_config", "load_search_config", "search",
]
