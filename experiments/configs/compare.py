"""The default search at the scale of the committed baseline comparison
(``results/baselines/``; ``experiments/compare_baselines.py``).

The default problem (``experiments/configs/default.py``: resnet20 on the embedded
Fashion-MNIST, 250 fitness / 500 selection images, NEMO's four species) with a smaller
population and fewer generations, so that ten methods x five seeds fit in about an
hour and a half of a 2-core CPU: population 16 (``min_species_size`` 2, so resizing has
room to act) for 6 generations (112 evaluations per run), and 500 test images.
"""

import os

from nemo_jax import load_config_file


def get_config():
  d = load_config_file(os.path.join(os.path.dirname(__file__), "default.py"))
  d["search"].update(population=16, generations=6, min_species_size=2)
  d["run"].update(final_max_images=500)
  return d
