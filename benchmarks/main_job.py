"""The README's main job, timed as a new user runs it: cold and warm XLA cache.

Runs ``nemo-jax search --out DIR`` (the README's first command, after the install) as a
subprocess twice: first with empty compilation and calibration caches (cold), then again
with the caches the first run filled (warm; a new output directory). Prints ONE JSON line:
wall seconds per run (process start to exit), the run's own phases (setup: data,
calibration, tables, evaluator; the search loop; the final phase; writing outputs), compile
seconds and XLA compile counts per generation, the evaluation cache's hits, and the share
of the wall time spent outside accuracy evaluation.

    python benchmarks/main_job.py [--args "--generations 5"] [--keep DIR]

Time it with nothing else running (2 cores: anything beside it is in the figures).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time


def run_once(work: str, name: str, extra: list[str]) -> dict:
  out = os.path.join(work, name)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(work, "xla_cache"),
             NEMO_JAX_CACHE_DIR=os.path.join(work, "nemo_cache"))
  cmd = [sys.executable, "-m", "nemo_jax.cli", "search", "--out", out, *extra]
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  with open(os.path.join(out, "config.json")) as f:
    saved = json.load(f)
  with open(os.path.join(out, "history.csv")) as f:
    history = list(csv.DictReader(f))
  t = saved["timing"]
  evaluation = (t.get("accuracy_seconds", 0.0) + t.get("final_seconds", 0.0)
                + t.get("sensitivity_seconds", 0.0))
  quality = saved.get("quality", {})
  return {
      "wall_seconds": round(wall, 2),
      "phases": {"startup_and_import": round(wall - t["total_seconds"], 2),
                 "setup": t.get("setup_seconds"), "sensitivity": t.get("sensitivity_seconds"),
                 "search_loop": t.get("search_seconds"),
                 "final_phase": t.get("final_seconds"), "outputs": t.get("output_seconds")},
      "compile_seconds": {"setup": t.get("setup_compile_seconds"),
                          "search_loop": t.get("search_compile_seconds"),
                          "final_phase": t.get("final_compile_seconds")},
      "compile_seconds_per_generation": [float(r["compile_seconds"]) for r in history],
      "compiles_per_generation": [int(float(r.get("compiles", 0))) for r in history],
      "generation_seconds": [float(r["seconds"]) for r in history],
      "evaluations": int(float(history[-1]["evaluations"])),
      "cache_hits": t.get("cache_hits"),
      "share_outside_accuracy_evaluation": round(1.0 - evaluation / wall, 3),
      "front_size": len(json.load(open(os.path.join(out, "front.json")))),
      "bounded_hypervolume": quality.get("bounded_hypervolume"),
      "final_hypervolume": saved.get("final_hypervolume"),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--args", default="", help="extra `nemo-jax search` arguments")
  p.add_argument("--keep", help="keep the run directories and caches here")
  args = p.parse_args(argv)
  work = args.keep or tempfile.mkdtemp(prefix="nemo_jax_main_job_")
  os.makedirs(work, exist_ok=True)
  extra = shlex.split(args.args)
  cold = run_once(work, "cold", extra)
  warm = run_once(work, "warm", extra)
  print(json.dumps({
      "benchmark": "main_job", "command": "nemo-jax search --out DIR " + args.args,
      "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or
                  platform.machine(), "python": platform.python_version()},
      "cold": cold, "warm": warm,
      "targets": {"cold_wall_seconds": 300, "warm_wall_seconds": 150},
      "baseline": {"issue_26_cold_wall_seconds": 529},
  }))


if __name__ == "__main__":
  main()
