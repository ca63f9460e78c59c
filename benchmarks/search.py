"""Where a NEMO generation spends its time: accuracy evaluation vs everything else.

Runs the default search for a few generations after compilation and prints one JSON line:
per-generation wall time, the accuracy call's time (the baseline, measured in the same
run) and the fraction of a generation spent outside it (target < 5%).

    python benchmarks/search.py [--generations 6] [--config experiments/configs/default.py]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

import nemo_jax



def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..",
                                                  "experiments", "configs", "default.py"))
  p.add_argument("--generations", type=int, default=6)
  args = p.parse_args(argv)
  cfg = nemo_jax.load_search_config(args.config, generations=args.generations,
                                    final_split=None, selection_per_class=0)
  t0 = time.perf_counter()
  problem = nemo_jax.build_problem(cfg)
  build_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  res = nemo_jax.search(cfg, out_dir=None, progress=False, problem=problem)
  total_s = time.perf_counter() - t0
  steady = res.history[2:]          # generations 0 and 1 include compilation
  gen_s = np.array([r["seconds"] for r in steady])
  acc_s = np.array([r["accuracy_seconds"] for r in steady])
  out = {
      "benchmark": "search_generation", "backend": jax.default_backend(),
      "model": cfg.model, "population": cfg.population,
      "eval_images": int(problem.evaluator.num_images), "species": len(cfg.species),
      "build_problem_s": round(build_s, 2), "first_two_generations_s (compile)":
          round(sum(r["seconds"] for r in res.history[:2]), 2),
      "total_s": round(total_s, 2),
      "generation_s_mean": round(float(gen_s.mean()), 4),
      "accuracy_s_mean (baseline)": round(float(acc_s.mean()), 4),
      "outside_accuracy_fraction": round(float(1 - acc_s.sum() / gen_s.sum()), 4),
      "target_outside_fraction": 0.05,
      "configs_per_s": round(cfg.population / float(gen_s.mean()), 2),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
