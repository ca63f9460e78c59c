"""The MobileNet-V2 problem (``experiments/configs/mobilenet.py``) at the scale of the
committed comparison (``results/baselines_mobilenet/``; ``experiments/compare_baselines.py``):
population 16 for 6 generations (112 distinct evaluations per run), 500 test images,
as ``compare.py`` does for the default problem.
"""

import os

from nemo_jax import load_config_file


def get_config():
  d = load_config_file(os.path.join(os.path.dirname(__file__), "mobilenet.py"))
  d["search"].update(population=16, generations=6, min_species_size=2)
  d["run"].update(final_max_images=500)
  return d
