"""Post-training calibration methods on the default model (prints ONE JSON line).

For every weight quantizer (``--weights``, default: today's symmetric narrow per-channel
and NEMO's uniform affine per-channel) and calibration method (``--methods``), the test
top-1 of uniform W8A8, W4A8, W4A4, W3A8, W2A8 of the default model
(``experiments/configs/default.py``: the shipped ResNet-20 on the embedded
Fashion-MNIST, 2000 test images) against the float model, measured in the same run.

Cost: the seconds of one evaluator call on the fitness images with a population of
``population`` random configurations (what one search generation evaluates), per
method against ``minmax`` with the same quantizer (runs interleaved, minimum of
``--repeats``); the target is <= 5% overhead (the tables are looked up, not searched).
``table_seconds``: the one-off cost of building the tables (cached afterwards).

``--search-seeds 0,1,2`` adds the final front hypervolume of a search per method and
seed (``--search-config``, default the default config, with ``--generations`` /
``--population``; CPU-expensive: minutes per run): on the selection images (out of
sample, ``nemo_jax.front_hypervolume``; the issue's measure) and on the fitness images
(in sample), each method's mean against ``minmax`` (the target: >= +5% on selection).

Usage::

    JAX_PLATFORMS=cpu python benchmarks/ptq.py [--methods minmax,mse] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from nemo_jax import build_problem, data, evaluation, load_search_config, search  # noqa: E402

UNIFORM = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W3A8": (3, 8), "W2A8": (2, 8)}
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                              "default.py")


def uniform_configs(problem):
  L, La = problem.workload.num_layers, problem.workload.num_act_quantizers
  w = np.asarray([[w] * L for w, _ in UNIFORM.values()])
  a = np.asarray([[a] * La for _, a in UNIFORM.values()])
  return problem.configs([1.0] * len(UNIFORM), w, a)


def random_configs(problem, population: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  choices = np.asarray(problem.cfg.bit_choices)
  L, La = problem.workload.num_layers, problem.workload.num_act_quantizers
  return problem.configs([1.0] * population, rng.choice(choices, (population, L)),
                         rng.choice(choices, (population, La)))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser()
  p.add_argument("--config", default=DEFAULT_CONFIG)
  p.add_argument("--methods", default=",".join(evaluation.CALIBRATIONS))
  p.add_argument("--weights", default="symmetric_per_channel,asymmetric_per_channel",
                 help="weight quantizers, each MODE or MODE:RANGE")
  p.add_argument("--test-images", type=int, default=2000)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--search-seeds", default="", help="e.g. 0,1,2 (optional, slow)")
  p.add_argument("--search-config", default=None,
                 help="config of the searches (default: --config)")
  p.add_argument("--generations", type=int, default=None)
  p.add_argument("--population", type=int, default=None)
  args = p.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  weights = [w for w in args.weights.split(",") if w]

  with tempfile.TemporaryDirectory() as cache:
    os.environ["NEMO_JAX_CACHE_DIR"] = cache   # measure table building, not the cache
    base = load_search_config(args.config)
    x_test, y_test = data.load_split(base.dataset, "test", source_dir=base.data_dir)
    x_test = data.preprocess(base.dataset, x_test)
    x_test, y_test = x_test[:args.test_images], y_test[:args.test_images]
    out = {"benchmark": "ptq", "model": base.model, "dataset": base.dataset,
           "test_images": int(len(x_test)), "fitness_images": None,
           "population": base.population, "uniform": list(UNIFORM), "top1": {},
           "eval_seconds": {}, "overhead": {}, "table_seconds": {}}
    for wq in weights:
      mode, _, wrange = wq.partition(":")
      problems, top1 = {}, {}
      for m in methods:
        t0 = time.perf_counter()
        problem = build_problem(load_search_config(args.config, calibration=m,
                                                   weight_quant=mode,
                                                   weight_range=wrange or None),
                                progress=False)
        out["table_seconds"][f"{wq}/{m}"] = round(time.perf_counter() - t0, 2)
        problems[m] = problem
        test_eval = problem.make_evaluator(x_test, y_test)
        if "float" not in out:
          out["float"] = float(test_eval.evaluate_float().top1)
          out["fitness_images"] = problem.evaluator.num_images
        res = test_eval.run(uniform_configs(problem)).top1
        top1[m] = {k: round(float(v), 4) for k, v in zip(UNIFORM, res)}
      out["top1"][wq] = top1

      # one generation's evaluator call, tables vs minmax (interleaved minima)
      configs = random_configs(problems[methods[0]], base.population)
      times = {m: float("inf") for m in methods}
      for m in methods:
        problems[m].evaluator.run(configs)   # compile
      for _ in range(args.repeats):
        for m in methods:
          t0 = time.perf_counter()
          problems[m].evaluator.run(configs)
          times[m] = min(times[m], time.perf_counter() - t0)
      out["eval_seconds"][wq] = {m: round(t, 3) for m, t in times.items()}
      if "minmax" in times:
        out["overhead"][wq] = {m: round(t / times["minmax"] - 1.0, 4)
                               for m, t in times.items() if m != "minmax"}

    if args.search_seeds:
      seeds = [int(s) for s in args.search_seeds.split(",")]
      search_cfg = dataclasses.replace(  # selection images only: no test re-evaluation
          load_search_config(args.search_config or args.config,
                             generations=args.generations, population=args.population),
          final_split=None)
      hv = {"selection": {}, "fitness": {}}
      for wq in weights:
        mode, _, wrange = wq.partition(":")
        for m in methods:
          runs = [search(search_cfg, progress=False, calibration=m, weight_quant=mode,
                         weight_range=wrange or None, seed=s).hypervolume for s in seeds]
          for k in hv:
            hv[k][f"{wq}/{m}"] = [round(r[k], 5) for r in runs]
      gain = {k: {name: round(float(np.mean(v)) / float(np.mean(h[f"{name.split('/')[0]}/minmax"]))
                              - 1.0, 4)
                  for name, v in h.items() if f"{name.split('/')[0]}/minmax" in h}
              for k, h in hv.items()}
      out["search"] = {"seeds": seeds, "generations": search_cfg.generations,
                       "population": search_cfg.population,
                       "evaluations": search_cfg.population * (search_cfg.generations + 1),
                       "final_hypervolume": hv, "gain_over_minmax": gain}
  out["targets"] = {"W4A4_within_points_of_float": 1.5, "overhead_max": 0.05,
                    "selection_hypervolume_gain_min": 0.05}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
