"""NEMO vs NSGA-II vs random search (vs single-species NEMO) at equal evaluations.

Every method runs in the same engine on the same problem (default model, same fitness
subset, same objectives: top-1 error, model ratio, BOPs ratio; all minimised) with the
same population and generations, so each evaluates exactly
``population * (generations + 1)`` configurations. The final hypervolume of each run's
archive (reference point 1 on every normalised objective) is reported as mean +- std over
seeds, with a plot of hypervolume against evaluations.

    python experiments/compare_baselines.py --seeds 0 1 2 --generations 25 --out runs/baselines
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import nemo_jax


METHODS = {
    "nemo": {},   # the default: four species, NSGA-III joint ranking, UCB resizing
    "nsga2": {"species": ["direct_round"], "selection": "nsga2", "resize": False},
    "random": {"species": ["random"], "resize": False},
    "nemo_single_gcn": {"species": ["gcn"], "resize": False},
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs",
                                                  "default.py"))
  p.add_argument("--methods", nargs="+", default=["nemo", "nsga2", "random"],
                 choices=sorted(METHODS))
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--generations", type=int)
  p.add_argument("--population", type=int)
  p.add_argument("--out", default="runs/baselines")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  base = nemo_jax.load_search_config(args.config, generations=args.generations,
                                     population=args.population, final_split=None,
                                     selection_per_class=0)   # hypervolume only
  problem = nemo_jax.build_problem(base)   # one fitness subset and calibration for every run
  results = {}
  for method in args.methods:
    for seed in args.seeds:
      t0 = time.perf_counter()
      res = nemo_jax.search(base, out_dir=None, progress=False, problem=problem, seed=seed,
                            **METHODS[method])
      curve = [(r["evaluations"], r["hypervolume"]) for r in res.history]
      results.setdefault(method, []).append({"seed": seed, "hypervolume": curve[-1][1],
                                             "evaluations": curve[-1][0], "curve": curve,
                                             "front_size": len(res.front),
                                             "seconds": time.perf_counter() - t0})
      print(f"{method:>16s} seed {seed}: HV {curve[-1][1]:.4f} after {curve[-1][0]} "
            f"evaluations ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
  table = {m: {"mean": float(np.mean([r["hypervolume"] for r in rs])),
               "std": float(np.std([r["hypervolume"] for r in rs])),
               "evaluations": rs[0]["evaluations"]} for m, rs in results.items()}
  print(f"{'method':>16s}  {'hypervolume (mean +- std)':>26s}  evaluations")
  for m, t in table.items():
    print(f"{m:>16s}  {t['mean']:>15.4f} +- {t['std']:.4f}  {t['evaluations']:>11d}")
  with open(os.path.join(args.out, "baselines.json"), "w") as f:
    json.dump({"table": table, "runs": results, "config": base.to_dict()}, f, indent=1)
  _plot(results, os.path.join(args.out, "baselines.png"))
  print(f"\nwrote {args.out}/baselines.json and {args.out}/baselines.png")
  return table


def _plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for m, rs in results.items():
    ev = np.array([e for e, _ in rs[0]["curve"]])
    hv = np.array([[h for _, h in r["curve"]] for r in rs])
    ax.plot(ev, hv.mean(0), label=f"{m} (n={len(rs)})")
    ax.fill_between(ev, hv.min(0), hv.max(0), alpha=0.2)
  ax.set_xlabel("evaluations")
  ax.set_ylabel("hypervolume (normalised, ref = 1)")
  ax.set_title("archive hypervolume at equal evaluations")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
