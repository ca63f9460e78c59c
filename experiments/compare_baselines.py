"""NEMO against its baselines and ablations at equal distinct evaluations, over paired seeds.

Every search method runs in the same engine on the same problem (one fitness subset,
one calibration, the same images for every seed: ``data_seed`` fixed, the same
objectives, all minimised) with the same population, until it has evaluated ``--budget``
DISTINCT configurations (default ``population * (generations + 1)``; repeats are answered
by the evaluation cache and do not count; a run stops after the generation that reaches
the budget, so it may exceed it by less than a population):

* ``nemo``: the config's species, NSGA-III joint ranking, UCB resizing;
* ``nemo_fixed_sizes``: the same species at fixed equal sizes (ablation: no resizing);
* ``nemo_legacy_resize``: resizing as before issue 15 (min-max utilities, 2x growth cap);
* ``nemo_seed_uniform``: the direct species start from uniform-precision configs;
* ``alone:<species>``: each of the config's species alone with the whole population;
* ``nsga2``: one ``direct_round`` species with NSGA-II selection (SBX + polynomial
  mutation: NSGA-II);
* ``random``: random search (fresh uniform genomes every generation);
* ``nemo_type_features``: GNN node features reduced to the op-type one-hots (ablation:
  no graph features);
* ``nemo_sequential`` / ``nemo_dataflow``: the other edge set than the config's
  (ablation: sequential vs data-flow edges);
* ``greedy``: the greedy sensitivity allocation (start at the highest bits, repeatedly
  lower the quantizer with the best cost saving per sensitivity loss; its frontier
  evaluated coarse to fine within the same budget; ``search/guide.py``);
* ``nemo_guided``: NEMO with every sensitivity-informed option (GNN sensitivity features,
  greedy seeds and sensitivity-weighted mutation for the direct species), and the
  ablations ``nemo_sens_features`` / ``nemo_seed_greedy`` / ``nemo_sens_mutation`` (one
  option each);
* ``uniform_sweep``: every uniform (weight bits, activation bits) pair, evaluated once
  (``len(bit_choices) ** 2`` evaluations, not the search budget).

The methods that use sensitivity share the problem's sensitivity table (each searched
quantizer alone at each bit-width on the fitness images; computed once per problem,
not counted in the budget: ``run/sensitivity.py``).

Search quality (``docs/DESIGN.md``, "Search quality") per run, on the selection and test
images: the drop-bounded hypervolume (box: float error to float + 5 points, cheapest to
W8A8 costs), the iso-accuracy gain over the best uniform point at <= 1 point (model size
and BOPs factors, picked on selection, reported on test) and the iso-cost test top-1
gain at the uniform points' costs. ``quality.md`` / ``quality.csv``: per method the mean
over seeds, the mean paired difference to the uniform sweep and to NEMO with bootstrap
95% confidence intervals (10,000 resamples of the seeds); ``per_seed.csv``: every run's
figures, so every mean can be re-derived.

The final hypervolume (reference ``hv_ref``, default 1 on every normalised objective) of
the archive front is reported in sample (``fitness``: the images the search optimised)
and out of sample on each of ``--images`` (default both): ``selection`` (the front
members' ``selection_top1`` on the config's ``selection_per_class`` held-out training
images) and ``test`` (``final_top1`` on the config's ``final_split``); see
``nemo_jax.front_hypervolume`` and ``docs/DESIGN.md``, "Image sets". The hypervolume
curve over evaluations is the in-sample one (``history.csv``). For each method the table
also says in what fraction of seeds the front dominates the uniform W8A8, W4A4 and W3A8
points on the same images.

Writes to ``--out``: ``quality.md`` / ``quality.csv``, ``per_seed.csv``, ``table.csv`` /
``table.md`` (the plain hypervolumes, mean +- std over seeds), ``hypervolume.png`` and
``runs.json``; ``--merge`` joins the outputs of several runs (methods or seeds run in
parallel) into one table.

    python experiments/compare_baselines.py --config experiments/configs/compare.py \\
        --out results/baselines
    python experiments/compare_baselines.py --config experiments/configs/smoke.py \\
        --seeds 2 --generations 3 --population 16 --out results/baselines_smoke
    python experiments/compare_baselines.py --merge runs/a runs/b --out results/baselines
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

import nemo_jax
from nemo_jax import evolution, front_objectives
from nemo_jax.costs import FEATURE_NAMES, KIND_ACTIVATION

OUT_OF_SAMPLE = ("selection", "test")
REFERENCE_POINTS = ((8, 8), (4, 4), (3, 8))  # (weight bits, activation bits)
SWEEP = "uniform_sweep"
REFERENCE = "reference_points"


def method_overrides(base) -> dict[str, dict]:
  """Every method's config overrides (the uniform sweep is handled apart)."""
  other_edges = "dataflow" if base.edges == "sequential" else "sequential"
  methods = {
      "nemo": {},
      "nemo_fixed_sizes": {"resize": False},
      "nemo_legacy_resize": {"utility_norm": "minmax", "max_growth": 2.0},
  }
  seeded = [dict(s.to_dict(), seed_uniform=True) if s.kind in ("direct_round", "direct_floor")
            and s.optimizer == "ga" else s.to_dict() for s in base.species]
  if any(s["seed_uniform"] for s in seeded):
    methods["nemo_seed_uniform"] = {"species": seeded}
  for i, s in enumerate(base.species):
    name = f"alone:{s.label}"
    methods[name if name not in methods else f"{name}-{i}"] = {
        "species": [s.to_dict()], "resize": False}
  methods["nsga2"] = {"species": ["direct_round"], "selection": "nsga2", "resize": False}
  methods["random"] = {"species": ["random"], "resize": False}
  methods["greedy"] = {"species": ["greedy"], "resize": False, "min_species_size": 1}
  direct = ("direct_round", "direct_floor")

  def guided(seed_greedy=False, mutation=False):
    out = []
    for sp in base.species:
      d = sp.to_dict()
      if sp.kind in direct and sp.optimizer == "ga":
        d.update(seed_greedy=seed_greedy or d.get("seed_greedy", False),
                 sensitivity_mutation=mutation or d.get("sensitivity_mutation", False))
      out.append(d)
    return out

  if any(sp.kind in direct for sp in base.species):
    methods["nemo_guided"] = {"species": guided(True, True), "sensitivity_features": True}
    methods["nemo_seed_greedy"] = {"species": guided(seed_greedy=True)}
    methods["nemo_sens_mutation"] = {"species": guided(mutation=True)}
  methods["nemo_sens_features"] = {"sensitivity_features": True}
  methods["nemo_type_features"] = {
      "node_features": [n for n in FEATURE_NAMES if n.startswith("type:")]}
  methods[f"nemo_{other_edges}"] = {"edges": other_edges}
  return methods


def pair_species(pairs, family):
  """A species whose member ``j`` is the uniform config ``pairs[j % len(pairs)]``.

  ``pairs`` are (weight, activation) choice indices; the search space says which searched
  node is an activation quantizer (``SearchSpace.active_kinds``).
  """
  table = jnp.asarray(pairs, jnp.int32)

  def builder(space, specs, species_indices, capacity, graph, feature_dim):
    is_act = jnp.asarray(space.active_kinds == KIND_ACTIVATION)

    def init(key):
      del key
      j = jnp.arange(capacity, dtype=jnp.float32) % len(pairs)
      return jnp.broadcast_to(j[None, :, None], (len(specs), capacity, 1))

    def decode(genomes):
      wa = table[genomes[..., 0].astype(jnp.int32)]
      choice = jnp.where(is_act, wa[..., 1:2], wa[..., 0:1]).astype(jnp.int32)
      return choice, jnp.full(genomes.shape[:2], space.num_keep - 1, jnp.int32)

    return evolution.ga_group(family, species_indices, init, lambda key, p, pr, s: p, decode)

  return builder


def sweep_pairs(cfg):
  """Every uniform (weight, activation) choice pair (weights only without searched
  activations)."""
  k = len(cfg.bit_choices)
  if not cfg.quantize_activations:
    return [(w, w) for w in range(k)]
  return [(w, a) for w in range(k) for a in range(k)]


def _spread_bits(workload, configs):
  """A cost that falls as the bits rise: with it no uniform point dominates another."""
  bits = jnp.mean(configs.w_bits.astype(jnp.float32), -1) + 0.01 * jnp.mean(
      configs.a_bits.astype(jnp.float32), -1)
  return 1.0 / (1.0 + bits)


def reference_members(base) -> dict[str, dict]:
  """The uniform W8A8 / W4A4 / W3A8 points scored like front members (same final phase:
  ``final_top1`` and, when the config has one, ``selection_top1``).

  One search of generation 0 evaluates them; an extra objective that falls as the bits
  rise keeps all of them on its front.
  """
  points = [(w, a) for w, a in REFERENCE_POINTS if w in base.bit_choices
            and (a in base.bit_choices or not base.quantize_activations)]
  if not points:
    return {}
  index = {b: i for i, b in enumerate(base.bit_choices)}
  pairs = [(index[w], index.get(a, index[w])) for w, a in points]
  registries = (nemo_jax.Registries().with_species(REFERENCE, pair_species(pairs, REFERENCE))
                .with_cost("spread_bits", _spread_bits))
  res = nemo_jax.search(base, out_dir=None, progress=False, registries=registries,
                        objectives=list(base.objectives) + ["spread_bits"],
                        species=[REFERENCE], resize=False, generations=0, population=4,
                        min_species_size=2)
  members = {}
  for m in res.front:
    w, a = m["w_bits"][0], m["a_bits"][0] if m["a_bits"] else m["w_bits"][0]
    members[f"W{w}A{a}"] = m
  return {f"W{w}A{a}": members[f"W{w}A{a}"] for w, a in points
          if f"W{w}A{a}" in members}


def dominates_point(front_F, point) -> bool:
  """Whether some row of ``front_F`` weakly dominates ``point`` (<= everywhere, < once)."""
  if front_F is None or point is None or not len(front_F):
    return False
  le = np.all(front_F <= point[None] + 1e-12, axis=1)
  lt = np.any(front_F < point[None] - 1e-12, axis=1)
  return bool(np.any(le & lt))


def run_method(name, base, problem, seed, overrides, registries, budget=None):
  t0 = time.perf_counter()
  overrides = dict(overrides)
  if budget is not None and "budget" not in overrides:
    # The budget decides (distinct evaluations); generations only bound a run that keeps
    # proposing repeats.
    overrides.setdefault("generations", 8 * (base.generations + 1))
    overrides["budget"] = budget
  res = nemo_jax.search(base, out_dir=None, progress=False, problem=problem, seed=seed,
                        registries=registries, **overrides)
  curve = [(r["unique_evaluations"], r["hypervolume"]) for r in res.history]
  sizes = {k[5:]: v for k, v in res.history[-1].items() if k.startswith("size:")}
  return {"method": name, "seed": seed, "evaluations": res.history[-1]["evaluations"],
          "unique_evaluations": curve[-1][0], "curve": curve,
          "hv_fitness": curve[-1][1], "front": res.front, "sizes": sizes,
          "front_species": sorted({m["species"] for m in res.front}),
          "hv": {s: v for s, v in res.hypervolume.items() if s != "fitness"},
          "quality": quality_figures(res.quality),
          "seconds": time.perf_counter() - t0}


QUALITY_COLUMNS = ("bhv_selection", "bhv_test", "gain_model_1pt", "gain_bops_1pt",
                   "iso_cost_gain")
"""Per-run search-quality figures (``quality_figures``)."""


def quality_figures(q) -> dict:
  """The headline figures of a run's ``quality`` report (NaN where not measured).

  ``bhv_*``: drop-bounded hypervolume; ``gain_*_1pt``: front / best-uniform reduction
  factor at <= 1 point below float (picked on selection; NaN when the front has no member
  that close: then it has no gain to report); ``iso_cost_gain``: mean test top-1 gain (in
  points) of the best member over each uniform point at its costs (points without an as
  cheap member excluded).
  """
  out = {"bhv_selection": q.get("bounded_hypervolume", {}).get("selection", float("nan")),
         "bhv_test": q.get("bounded_hypervolume", {}).get("test", float("nan")),
         "uniform_bhv_test": q.get("uniform_bounded_hypervolume", {}).get("test",
                                                                          float("nan"))}
  for row in q.get("iso_accuracy", []):
    if row["drop"] == 0.01:
      key = "gain_model_1pt" if row["cost"] == "model_ratio" else "gain_bops_1pt"
      out[key] = float("nan") if row["gain"] is None else float(row["gain"])
      front = row["front"]
      out[key.replace("gain", "factor")] = float("nan") if front is None else front["factor"]
  gains = [100.0 * (r["test_top1"] - r["uniform_test_top1"]) for r in q.get("iso_cost", [])
           if r["test_top1"] is not None and r["uniform_test_top1"] is not None]
  out["iso_cost_gain"] = float(np.mean(gains)) if gains else float("nan")
  for k in QUALITY_COLUMNS:
    out.setdefault(k, float("nan"))
  return out


def bootstrap_ci(values, resamples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
  """Mean and the 95% percentile-bootstrap interval of the mean (NaNs dropped)."""
  x = np.asarray([v for v in values if np.isfinite(v)], np.float64)
  if not len(x):
    return float("nan"), float("nan"), float("nan")
  if len(x) == 1:
    return float(x[0]), float(x[0]), float(x[0])
  rng = np.random.default_rng(seed)
  means = x[rng.integers(0, len(x), (resamples, len(x)))].mean(1)
  return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs",
                                                  "default.py"))
  p.add_argument("--methods", nargs="+", default=None,
                 help="subset of the methods (default: all; see the module docstring)")
  p.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
  p.add_argument("--first-seed", type=int, default=0)
  p.add_argument("--generations", type=int)
  p.add_argument("--population", type=int)
  p.add_argument("--images", nargs="+", choices=OUT_OF_SAMPLE, default=list(OUT_OF_SAMPLE),
                 help="out-of-sample image sets of the reported hypervolumes (default: "
                      "selection test; the first is plotted and ranks the methods)")
  p.add_argument("--budget", type=int, help="distinct evaluations per run (default: "
                 "population * (generations + 1))")
  p.add_argument("--out", default="results/baselines")
  p.add_argument("--merge", nargs="+", metavar="DIR",
                 help="run nothing: merge the runs.json of earlier --out folders (e.g. "
                      "methods or seeds run in parallel) into one table in --out")
  args = p.parse_args(argv)
  if args.merge:
    return merge(args.merge, args.out)
  if args.seeds < 1:
    p.error(f"--seeds must be >= 1, got {args.seeds}")
  base = nemo_jax.load_search_config(args.config, generations=args.generations,
                                     population=args.population)
  images = list(dict.fromkeys(args.images))
  # Paired seeds: every method and seed sees the same images (data_seed fixed); a set
  # not reported is not evaluated in the final phase.
  base = nemo_jax.load_search_config(
      base, data_seed=base.image_seed,
      selection_per_class=base.selection_per_class if "selection" in images else 0)
  if "test" not in images:
    base = base.replace(final_split=None)
  if "selection" in images and base.selection_per_class == 0:
    p.error("--images selection needs a config with selection_per_class > 0")
  if "test" in images and base.final_split is None:
    p.error("--images test needs a config with final_split set")
  if "top1_error" not in base.objectives:
    p.error(f"--images {' '.join(images)} needs 'top1_error' among the objectives "
            f"{list(base.objectives)} (the final phase measures top-1 only)")
  methods = method_overrides(base)
  methods[SWEEP] = None
  chosen = args.methods or list(methods)
  unknown = [m for m in chosen if m not in methods]
  if unknown:
    p.error(f"--methods: unknown {unknown}; allowed: {list(methods)}")
  os.makedirs(args.out, exist_ok=True)
  seeds = list(range(args.first_seed, args.first_seed + args.seeds))
  pairs = sweep_pairs(base)
  registries = nemo_jax.Registries().with_species(SWEEP, pair_species(pairs, SWEEP))
  problem = nemo_jax.build_problem(base)   # one fitness subset and calibration for all
  refs = reference_members(base)
  ref_F = {(s, k): front_objectives([m], base, s) for s in images for k, m in refs.items()}
  ref_F = {sk: (None if f is None else f[0]) for sk, f in ref_F.items()}

  budget = args.budget or base.population * (base.generations + 1)
  runs = []
  for name in chosen:
    overrides = methods[name]
    run_budget = budget
    if overrides is None:  # the uniform sweep: one deterministic run
      overrides = {"species": [SWEEP], "resize": False, "generations": 0,
                   "population": max(len(pairs), 4), "min_species_size": 2,
                   "archive_size": max(base.archive_size, len(pairs))}
      run_seeds, run_budget = seeds[:1], None
    else:
      run_seeds = seeds
    for seed in run_seeds:
      r = run_method(name, base, problem, seed, overrides, registries, run_budget)
      r["dominates"] = {}
      for s in images:
        F = front_objectives(r["front"], base, s)
        r["dominates"][s] = {k: dominates_point(F, ref_F[s, k]) for k in refs}
      runs.append(r)
      hv = ", ".join(f"{s} {r['hv'][s]:.4f}" for s in images)
      q = r["quality"]
      print(f"{name:>22s} seed {seed}: HV fitness {r['hv_fitness']:.4f}, {hv}; bounded HV "
            f"test {q['bhv_test']:.4f}, gain at 1 point {q['gain_model_1pt']:.2f} (model) "
            f"{q['gain_bops_1pt']:.2f} (BOPs) after {r['unique_evaluations']} distinct "
            f"evaluations ({r['seconds']:.0f} s); sizes {r['sizes']}", file=sys.stderr)

  return write_results(args.out, runs, images, refs, base)


def write_results(out, runs, images, refs, cfg) -> list[dict]:
  """Writes ``quality.{md,csv}``, ``per_seed.csv``, ``table.csv``, ``table.md``,
  ``runs.json`` and ``hypervolume.png`` to ``out``."""
  seeds = sorted({r["seed"] for r in runs})
  table = summarise(runs, images, list(refs))
  write_table(table, out, images, list(refs), cfg, len(seeds))
  write_quality(runs, out, cfg, len(seeds))
  with open(os.path.join(out, "runs.json"), "w") as f:
    json.dump({"images": images, "seeds": seeds, "config": cfg.to_dict(),
               "reference_points": refs, "table": table, "runs": runs}, f, indent=1)
  plot(runs, table, images[0], os.path.join(out, "hypervolume.png"))
  print(open(os.path.join(out, "table.md")).read())
  print(open(os.path.join(out, "quality.md")).read())
  print(f"wrote {out}/quality.md, quality.csv, per_seed.csv, table.csv, table.md, "
        "hypervolume.png, runs.json")
  return table


def merge(dirs, out) -> list[dict]:
  """One table from the ``runs.json`` of several runs of this script (same config and
  image sets; a (method, seed) run twice is an error)."""
  parts = []
  for d in dirs:
    path = os.path.join(d, "runs.json")
    try:
      with open(path) as f:
        parts.append(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
      raise SystemExit(f"--merge: cannot read {path}: {e}")
  first = parts[0]
  for d, part in zip(dirs[1:], parts[1:]):
    for k in ("images", "config"):
      if part[k] != first[k]:
        raise SystemExit(f"--merge: {d}/runs.json has another {k!r} than {dirs[0]}")
  runs = [r for part in parts for r in part["runs"]]
  seen = set()
  for r in runs:
    if (r["method"], r["seed"]) in seen:
      raise SystemExit(f"--merge: method {r['method']!r} seed {r['seed']} is in two folders")
    seen.add((r["method"], r["seed"]))
  refs = {k: v for part in parts for k, v in part["reference_points"].items()}
  os.makedirs(out, exist_ok=True)
  return write_results(out, runs, first["images"], refs,
                       nemo_jax.load_search_config(first["config"]))


PER_SEED_COLUMNS = ("method", "seed", "unique_evaluations", "evaluations", "bhv_selection",
                    "bhv_test", "uniform_bhv_test", "gain_model_1pt", "gain_bops_1pt",
                    "factor_model_1pt", "factor_bops_1pt", "iso_cost_gain", "hv_selection",
                    "hv_test", "hv_fitness", "front_size", "seconds")


def write_quality(runs, out, cfg, num_seeds) -> list[dict]:
  """``per_seed.csv`` (every run) and ``quality.{csv,md}``: per method the mean of each
  quality figure, and the paired difference to the uniform sweep and to ``nemo`` with
  its bootstrap 95% interval."""
  rows = []
  for r in runs:
    q = r.get("quality") or quality_figures({})
    rows.append({"method": r["method"], "seed": r["seed"],
                 "unique_evaluations": r.get("unique_evaluations", r["evaluations"]),
                 "evaluations": r["evaluations"], **{k: q.get(k) for k in (
                     "bhv_selection", "bhv_test", "uniform_bhv_test", "gain_model_1pt",
                     "gain_bops_1pt", "factor_model_1pt", "factor_bops_1pt",
                     "iso_cost_gain")},
                 "hv_selection": r["hv"].get("selection"), "hv_test": r["hv"].get("test"),
                 "hv_fitness": r["hv_fitness"], "front_size": len(r["front"]),
                 "seconds": round(r["seconds"], 1)})
  with open(os.path.join(out, "per_seed.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=PER_SEED_COLUMNS)
    w.writeheader()
    w.writerows(rows)
  by = {}
  for row in rows:
    by.setdefault(row["method"], {})[row["seed"]] = row
  sweep = next(iter(by.get(SWEEP, {}).values()), None)
  nemo = by.get("nemo", {})
  table = []
  for method, per_seed in by.items():
    line = {"method": method, "seeds": len(per_seed)}
    for k in ("bhv_selection", "bhv_test", "gain_model_1pt", "gain_bops_1pt",
              "iso_cost_gain", "unique_evaluations"):
      vals = [float(v[k]) if v[k] is not None else float("nan") for v in per_seed.values()]
      line[f"{k}_mean"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    for k in ("bhv_selection", "bhv_test"):
      if sweep is not None and method != SWEEP:
        d = [float(v[k]) - float(sweep[k]) for v in per_seed.values()]
        line[f"{k}_vs_sweep"] = bootstrap_ci(d)
      if nemo and method != "nemo" and method != SWEEP:
        d = [float(nemo[s][k]) - float(v[k]) for s, v in per_seed.items() if s in nemo]
        line[f"nemo_minus_{k}"] = bootstrap_ci(d)
    table.append(line)
  with open(os.path.join(out, "quality.csv"), "w", newline="") as f:
    cols = sorted({k for line in table for k in line}, key=lambda k: (k != "method", k))
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for line in table:
      w.writerow({k: (";".join(f"{x:.5f}" for x in v) if isinstance(v, tuple) else v)
                  for k, v in line.items()})
  fmt_ci = lambda t: ("" if t is None or not np.isfinite(t[0]) else
                      f"{t[0]:+.4f} [{t[1]:+.4f}, {t[2]:+.4f}]")
  head = ["method", "seeds", "distinct evals", "bounded HV test", "vs sweep (95% CI)",
          "NEMO minus this (95% CI)", "bounded HV selection", "gain model @1pt",
          "gain BOPs @1pt", "iso-cost gain (points)"]
  lines = [f"Search quality ({cfg.model}; mean over {num_seeds} paired seeds; bounded HV: "
           "drop-bounded hypervolume, box float error .. +5 points x cheapest .. W8A8 costs; "
           "gains: front / best uniform reduction factor at <= 1 point below float, picked "
           "on selection; 95% intervals: bootstrap over seeds).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for line in table:
    lines.append("| " + " | ".join([
        line["method"], str(line["seeds"]), f"{line['unique_evaluations_mean']:.0f}",
        f"{line['bhv_test_mean']:.4f}", fmt_ci(line.get("bhv_test_vs_sweep")),
        fmt_ci(line.get("nemo_minus_bhv_test")), f"{line['bhv_selection_mean']:.4f}",
        f"{line['gain_model_1pt_mean']:.3f}", f"{line['gain_bops_1pt_mean']:.3f}",
        f"{line['iso_cost_gain_mean']:+.2f}"]) + " |")
  with open(os.path.join(out, "quality.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return table


def summarise(runs, images, ref_names) -> list[dict]:
  """One row per method: mean / std over seeds of the final hypervolumes."""
  rows = []
  for name in dict.fromkeys(r["method"] for r in runs):
    rs = [r for r in runs if r["method"] == name]
    row = {"method": name, "seeds": len(rs), "evaluations": rs[0]["evaluations"],
           "hv_fitness_mean": float(np.mean([r["hv_fitness"] for r in rs])),
           "hv_fitness_std": float(np.std([r["hv_fitness"] for r in rs]))}
    for s in images:
      hv = [r["hv"].get(s, float("nan")) for r in rs]
      row[f"hv_{s}_mean"], row[f"hv_{s}_std"] = float(np.mean(hv)), float(np.std(hv))
    row["front_size"] = float(np.mean([len(r["front"]) for r in rs]))
    row["seconds"] = float(np.mean([r["seconds"] for r in rs]))
    for s in images:
      for k in ref_names:
        row[f"dominates_{k}_{s}"] = float(np.mean([r["dominates"][s][k] for r in rs]))
    rows.append(row)
  return rows


def write_table(table, out, images, ref_names, cfg, num_seeds):
  cols = list(table[0].keys())
  with open(os.path.join(out, "table.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows(table)
  sets = "/".join(images)
  head = (["method", "seeds", "evaluations", "HV fitness (in sample)"]
          + [f"HV {s}" for s in images] + ["front size"]
          + [f"dominates {k} ({sets})" for k in ref_names])
  lines = [f"Final hypervolume, mean +- std over seeds ({cfg.model}, population "
           f"{cfg.population}, {cfg.generations} generations, {num_seeds} seeds; "
           f"'dominates': fraction of seeds whose front dominates the uniform point on the "
           f"{sets} images).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in table:
    cells = [r["method"], str(r["seeds"]), str(r["evaluations"]),
             f"{r['hv_fitness_mean']:.4f} +- {r['hv_fitness_std']:.4f}"]
    cells += [f"{r[f'hv_{s}_mean']:.4f} +- {r[f'hv_{s}_std']:.4f}" for s in images]
    cells.append(f"{r['front_size']:.1f}")
    cells += ["/".join(f"{r[f'dominates_{k}_{s}']:.2f}" for s in images) for k in ref_names]
    lines.append("| " + " | ".join(cells) + " |")
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def plot(runs, table, images, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5),
                               gridspec_kw={"width_ratios": [1.4, 1]})
  for name in dict.fromkeys(r["method"] for r in runs):
    rs = [r for r in runs if r["method"] == name]
    # Budgets count distinct evaluations, so seeds may run different numbers of
    # generations: the curves up to the shortest, at the seeds' mean evaluation counts.
    n = min(len(r["curve"]) for r in rs)
    ev = np.array([[e for e, _ in r["curve"][:n]] for r in rs]).mean(0)
    hv = np.array([[h for _, h in r["curve"][:n]] for r in rs])
    if len(ev) == 1:
      ax.plot(ev, hv.mean(0), "k*", markersize=10, label=name)
      continue
    ax.plot(ev, hv.mean(0), label=f"{name} (n={len(rs)})")
    ax.fill_between(ev, hv.min(0), hv.max(0), alpha=0.15)
  ax.set_xlabel("evaluations")
  ax.set_ylabel("hypervolume, fitness images (in sample)")
  ax.set_title("archive hypervolume at equal evaluations")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  names = [r["method"] for r in table]
  y = np.arange(len(names))
  mean = [r[f"hv_{images}_mean"] for r in table]
  std = [r[f"hv_{images}_std"] for r in table]
  bx.barh(y, mean, xerr=std, alpha=0.8)
  bx.set_yticks(y, names, fontsize=7)
  bx.invert_yaxis()
  lo = min((m - d for m, d in zip(mean, std) if np.isfinite(m)), default=0.0)
  bx.set_xlim(left=max(0.0, lo - 0.02))
  bx.set_xlabel(f"final hypervolume, {images} images (mean +- std)")
  bx.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
