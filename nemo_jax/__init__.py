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
front members of a run (quantization-aware); :class:`SearchConfig` is a run's
configuration in three sections (:class:`ProblemConfig`, :class:`EvolutionConfig`,
:class:`RunConfig`), :class:`QuantSpec` its quantizers; :class:`QuantConfig` is the
configuration pytree; :class:`Registries` carries user models, costs, schemes and
species; :class:`RunDir` reads a run directory. ``docs/DESIGN.md`` in the repository
describes the data flow and the contracts between the stages.
"""

__version__ = "0.1.0"

from nemo_jax._src.config_file import load_config_file
from nemo_jax._src.config_file import parse_variant as parse_config_variant
from nemo_jax._src.finetune import FinetuneConfig, finetune_members
from nemo_jax._src.precision import config_from_dict, config_to_dict, load_config
from nemo_jax._src.problem import Problem, ProblemConfig
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.registries import Registries
from nemo_jax._src.run.config import RunConfig, SearchConfig, load_search_config
from nemo_jax._src.run.final import front_hypervolume, front_objectives
from nemo_jax._src.run.quality import quality_report
from nemo_jax._src.run.quality import summary_lines as quality_summary
from nemo_jax._src.run.report import front_table, redraw
from nemo_jax._src.run.rundir import FrontMember, RunDir
from nemo_jax._src.run.search import SearchResult, build_problem, search, sensitivity
from nemo_jax._src.search.config import EvolutionConfig, SpeciesConfig
from nemo_jax._src.spec import QuantSpec

# The public modules, reachable as attributes after ``import nemo_jax``.
from nemo_jax import costs, data, emomc, evaluation, evolution, export, models, pareto, quant  # noqa: E402,I001

__all__ = [
    "EvolutionConfig", "FinetuneConfig", "FrontMember", "Problem", "ProblemConfig",
    "QuantConfig", "QuantSpec", "Registries", "RunConfig", "RunDir", "SearchConfig",
    "SearchResult", "SpeciesConfig", "build_problem", "config_from_dict", "config_to_dict",
    "costs", "data", "emomc", "evaluation", "evolution", "export", "finetune_members",
    "front_hypervolume", "front_objectives", "front_table", "load_config", "load_config_file",
    "load_search_config", "models", "pareto", "parse_config_variant", "quality_report",
    "quality_summary", "quant", "redraw", "sensitivity",
    "search",
]
