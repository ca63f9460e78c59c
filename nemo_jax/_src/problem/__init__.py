"""The problem: what configurations are, and how they are scored.

* ``config.py``: the problem section of a run's configuration (:class:`ProblemConfig`).
* ``space.py``: the search space a genome decodes to (:class:`SearchSpace`).
* ``images.py``: in-memory splits and the disjoint image sets of a run.
* ``sources.py``: the model source (checkpoint, EMOMC library, user model).
* ``core.py``: :class:`Problem` and :func:`compose_problem` (source + scheme + data +
  costs).
"""

from nemo_jax._src.problem.config import (ACCURACY_OBJECTIVES, EVAL_STRATEGIES, FITNESS_LABELS,
                                          IN_MEMORY_DATASET, IN_MEMORY_SPLITS, USER_MODEL,
                                          ProblemConfig, is_model_factory, is_user_model)
from nemo_jax._src.problem.core import (AccuracyCache, Problem, calibration_tables, check_cost_bounds,
                                        cheapest_config, compose_problem, float_predictions,
                                        make_scheme,
                                        population_pad)
from nemo_jax._src.problem.images import (IMAGE_SET_FIELDS, IMAGE_SETS, capped_split,
                                          data_splits, eval_split_sets, fitness_data,
                                          image_sets, selection_data, split_arrays)
from nemo_jax._src.problem.sources import (MIN_LIBRARY_WEIGHT_BITS, ModelSource,
                                           check_library_config, load_model_source,
                                           user_model_source)
from nemo_jax._src.problem.space import SearchSpace, search_space
