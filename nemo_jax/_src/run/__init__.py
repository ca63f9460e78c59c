"""A run: its configuration, the search driver, checkpoints, the run directory, reports.

* ``config.py``: the sectioned configuration (:class:`SearchConfig`) and its loader;
* ``search.py``: :func:`search` (the driver loop) and :func:`build_problem`;
* ``checkpoint.py``: checkpoints written whole and restored from the newest good step
  (shared by the search, fine-tuning and the EMOMC library trainer);
* ``rundir.py``: :class:`RunDir`, the one reader and writer of a run directory;
* ``final.py``: the final phase (front members, uniform baselines, held-out scores,
  hypervolumes);
* ``report.py``: pictures and tables.
"""
