"""EMOMC: two-stage pruning + quantization co-optimisation on the NEMO search engine.

* Stage I (``trainer.py`` with ``masks.py`` and ``io.py``; ``nemo-jax prune-library``):
  a library of pruned and retrained models, one orbax checkpoint per keep ratio p.
* Stage II: a search config with ``library=DIR`` searches ``[p, q_1..q_L]`` (p from the
  library, per-layer weight bits, FP16 activations) with the engine's NSGA-II or NEMO's
  species; the evaluation is the package's one evaluator with the library scheme
  (``schemes.library``, composed by ``problem.build_problem``).
* Report (``report.py``, ``nemo-jax emomc-report RUN_DIR``): EMOMC's table of energy
  improvement per dataflow and size compression per coding at <= 0.5% accuracy loss,
  next to pruning-only and quantization-only baselines.

The public API is ``nemo_jax.emomc``.
"""
