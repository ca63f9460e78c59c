"""NEMO against its baselines and ablations at equal evaluations, over several seeds.

Every search method runs in the same engine on the same problem (one fitness subset,
one calibration, the same objectives, all minimised) with the same population and
generations, so each evaluates exactly ``population * (generations + 1)``
configurations:

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
* ``uniform_sweep``: every uniform (weight bits, activation bits) pair, evaluated once
  (``len(bit_choices) ** 2`` evaluations, not the search budget).

The final hypervolume (reference ``hv_ref``, default 1 on every normalised objective) is
measured on the archive front with the accuracy objective taken on ``--images``:
``fitness`` (the images the search optimised: in sample), ``test`` (the front members'
``final_top1`` on the config's ``final_split``) or ``selection`` (``selection_top1``, the
config's ``selection_per_class`` held-out training images, ``docs/DESIGN.md``, "Image
sets"; other choices skip that set). The hypervolume curve over
evaluations is the in-sample one (``history.csv``). For each method the table also says
in what fraction of seeds the front dominates the uniform W8A8, W4A4 and W3A8 points on
the same images.

Writes to ``--out``: ``table.csv``, ``table.md`` (mean +- std over seeds),
``hypervolume.png`` and ``runs.json``.

    python experiments/compare_baselines.py --seeds 5 --generations 25 --images test \\
        --out results/baselines
    python experiments/compare_baselines.py --config experiments/configs/smoke.py \\
        --seeds 2 --generations 3 --population 16 --out results/baselines_smoke
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import nemo_jax
from nemo_jax import evolution, pareto
from nemo_jax.costs import FEATURE_NAMES

IMAGE_SETS = ("fitness", "selection", "test")
ACCURACY_KEY = {"test": "final_top1", "selection": "selection_top1"}
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
  seeded = [dict(dataclasses.asdict(s), seed_uniform=s.kind in ("direct_round", "direct_floor")
                 and s.optimizer == "ga") for s in base.species]
  if any(s["seed_uniform"] for s in seeded):
    methods["nemo_seed_uniform"] = {"species": seeded}
  for i, s in enumerate(base.species):
    name = f"alone:{s.label}"
    methods[name if name not in methods else f"{name}-{i}"] = {
        "species": [dataclasses.asdict(s)], "resize": False}
  methods["nsga2"] = {"species": ["direct_round"], "selection": "nsga2", "resize": False}
  methods["random"] = {"species": ["random"], "resize": False}
  methods["nemo_type_features"] = {
      "node_features": [n for n in FEATURE_NAMES if n.startswith("type:")]}
  methods[f"nemo_{other_edges}"] = {"edges": other_edges}
  return methods


def pair_species(pairs, family):
  """A species whose member ``j`` is the uniform config ``pairs[j % len(pairs)]``.

  ``pairs`` are (weight, activation) choice indices. Node ``2i`` of the workload is layer
  ``i``'s activation quantizer, ``2i + 1`` its weights (docs/DESIGN.md, "Contracts").
  """
  table = jnp.asarray(pairs, jnp.int32)

  def builder(space, specs, species_indices, capacity, graph, feature_dim):
    is_act = jnp.asarray([n % 2 == 0 for n in space.active_nodes])

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


def accuracy_hv(front, cfg, images: str) -> float:
  """Hypervolume of the front with the accuracy objective measured on ``images``."""
  F = _front_objectives(front, cfg, images)
  if F is None or not len(F):
    return float("nan")
  ref = np.asarray(cfg.hv_ref if cfg.hv_ref is not None else [1.0] * len(cfg.objectives))
  return float(pareto.hypervolume(jnp.asarray(F, jnp.float32), jnp.asarray(ref, jnp.float32)))


def _front_objectives(members, cfg, images):
  """``[N, M]`` objectives of members, top-1 error from ``images`` (None: not measured)."""
  names = list(cfg.objectives)
  F = np.asarray([[m["objectives"][n] for n in names] for m in members], np.float64)
  if images == "fitness" or not len(members):
    return F
  if "top1_error" not in names:
    raise ValueError(f"--images {images}: needs 'top1_error' among the objectives "
                     f"{names} (the final phase measures top-1 only)")
  key = ACCURACY_KEY[images]
  if any(key not in m for m in members):
    return None
  F[:, names.index("top1_error")] = [1.0 - m[key] for m in members]
  return F


def dominates_point(front_F, point) -> bool:
  """Whether some row of ``front_F`` weakly dominates ``point`` (<= everywhere, < once)."""
  if front_F is None or point is None or not len(front_F):
    return False
  le = np.all(front_F <= point[None] + 1e-12, axis=1)
  lt = np.any(front_F < point[None] - 1e-12, axis=1)
  return bool(np.any(le & lt))


def run_method(name, base, problem, seed, overrides, registries):
  t0 = time.perf_counter()
  res = nemo_jax.search(base, out_dir=None, progress=False, problem=problem, seed=seed,
                        registries=registries, **overrides)
  curve = [(r["evaluations"], r["hypervolume"]) for r in res.history]
  sizes = {k[5:]: v for k, v in res.history[-1].items() if k.startswith("size:")}
  return {"method": name, "seed": seed, "evaluations": curve[-1][0], "curve": curve,
          "hv_fitness": curve[-1][1], "front": res.front, "sizes": sizes,
          "front_species": sorted({m["species"] for m in res.front}),
          "seconds": time.perf_counter() - t0}


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
  p.add_argument("--images", choices=IMAGE_SETS, default="test",
                 help="images of the reported hypervolume (default test)")
  p.add_argument("--out", default="results/baselines")
  args = p.parse_args(argv)
  if args.seeds < 1:
    p.error(f"--seeds must be >= 1, got {args.seeds}")
  base = nemo_jax.load_search_config(args.config, generations=args.generations,
                                     population=args.population)
  if args.images != "selection":   # not reported: skip its final-phase evaluation
    base = nemo_jax.load_search_config(base, selection_per_class=0)
  if args.images == "selection" and base.selection_per_class == 0:
    p.error("--images selection needs a config with selection_per_class > 0")
  if args.images == "test" and base.final_split is None:
    p.error("--images test needs a config with final_split set")
  if args.images != "fitness" and "top1_error" not in base.objectives:
    p.error(f"--images {args.images} needs 'top1_error' among the objectives")
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
  problems = {}
  refs = reference_members(base)
  ref_F = {k: _front_objectives([m], base, args.images) for k, m in refs.items()}
  ref_F = {k: (None if f is None else f[0]) for k, f in ref_F.items()}

  runs = []
  for name in chosen:
    overrides = methods[name]
    if overrides is None:  # the uniform sweep: one deterministic run
      overrides = {"species": [SWEEP], "resize": False, "generations": 0,
                   "population": max(len(pairs), 4), "min_species_size": 2,
                   "archive_size": max(base.archive_size, len(pairs))}
      run_seeds = seeds[:1]
    else:
      run_seeds = seeds
    graph_keys = ("edges", "node_features")
    if any(k in overrides for k in graph_keys):
      key = tuple(str(overrides.get(k)) for k in graph_keys)
      if key not in problems:
        problems[key] = nemo_jax.build_problem(nemo_jax.load_search_config(
            base, **{k: overrides[k] for k in graph_keys if k in overrides}))
      method_problem = problems[key]
    else:
      method_problem = problem
    for seed in run_seeds:
      r = run_method(name, base, method_problem, seed, overrides, registries)
      r["hv_images"] = accuracy_hv(r["front"], base, args.images)
      if not np.isfinite(r["hv_images"]):
        print(f"warning: {name}: the front members have no {ACCURACY_KEY[args.images]!r} "
              f"(is the {args.images} set enabled in the config?)", file=sys.stderr)
      F = _front_objectives(r["front"], base, args.images)
      r["dominates"] = {k: dominates_point(F, f) for k, f in ref_F.items()}
      runs.append(r)
      print(f"{name:>22s} seed {seed}: HV fitness {r['hv_fitness']:.4f}, {args.images} "
            f"{r['hv_images']:.4f} after {r['evaluations']} evaluations "
            f"({r['seconds']:.0f} s); sizes {r['sizes']}", file=sys.stderr)

  table = summarise(runs, args.images, list(refs))
  write_table(table, args.out, args.images, list(refs), base, len(seeds))
  with open(os.path.join(args.out, "runs.json"), "w") as f:
    json.dump({"images": args.images, "seeds": seeds, "config": base.to_dict(),
               "reference_points": refs, "table": table, "runs": runs}, f, indent=1)
  plot(runs, table, args.images, os.path.join(args.out, "hypervolume.png"))
  print(open(os.path.join(args.out, "table.md")).read())
  print(f"wrote {args.out}/table.csv, table.md, hypervolume.png, runs.json")
  return table


def summarise(runs, images, ref_names) -> list[dict]:
  """One row per method: mean / std over seeds of the final hypervolumes."""
  rows = []
  for name in dict.fromkeys(r["method"] for r in runs):
    rs = [r for r in runs if r["method"] == name]
    row = {"method": name, "seeds": len(rs), "evaluations": rs[0]["evaluations"],
           "hv_fitness_mean": float(np.mean([r["hv_fitness"] for r in rs])),
           "hv_fitness_std": float(np.std([r["hv_fitness"] for r in rs])),
           "hv_mean": float(np.mean([r["hv_images"] for r in rs])),
           "hv_std": float(np.std([r["hv_images"] for r in rs])),
           "front_size": float(np.mean([len(r["front"]) for r in rs])),
           "seconds": float(np.mean([r["seconds"] for r in rs]))}
    for k in ref_names:
      row[f"dominates_{k}"] = float(np.mean([r["dominates"][k] for r in rs]))
    rows.append(row)
  return rows


def write_table(table, out, images, ref_names, cfg, num_seeds):
  cols = list(table[0].keys())
  with open(os.path.join(out, "table.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows(table)
  head = (["method", "seeds", "evaluations", "HV fitness (in sample)", f"HV {images}",
           "front size"] + [f"dominates {k}" for k in ref_names])
  lines = [f"Final hypervolume, mean +- std over seeds ({cfg.model}, population "
           f"{cfg.population}, {cfg.generations} generations, {num_seeds} seeds; "
           f"'dominates': fraction of seeds whose front dominates the point on the "
           f"{images} images).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in table:
    cells = [r["method"], str(r["seeds"]), str(r["evaluations"]),
             f"{r['hv_fitness_mean']:.4f} +- {r['hv_fitness_std']:.4f}",
             f"{r['hv_mean']:.4f} +- {r['hv_std']:.4f}", f"{r['front_size']:.1f}"]
    cells += [f"{r[f'dominates_{k}']:.2f}" for k in ref_names]
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
    ev = np.array([e for e, _ in rs[0]["curve"]])
    hv = np.array([[h for _, h in r["curve"]] for r in rs])
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
  bx.barh(y, [r["hv_mean"] for r in table], xerr=[r["hv_std"] for r in table], alpha=0.8)
  bx.set_yticks(y, names, fontsize=7)
  bx.invert_yaxis()
  lo = min(r["hv_mean"] - r["hv_std"] for r in table if np.isfinite(r["hv_mean"]))
  bx.set_xlim(left=max(0.0, lo - 0.02))
  bx.set_xlabel(f"final hypervolume, {images} images (mean +- std)")
  bx.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
