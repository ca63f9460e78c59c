"""How much can the fitness images resolve? Noise and rank agreement with the test set.

The search ranks configurations by their top-1 on the fitness images; a difference the
fitness set cannot resolve is noise the search optimises. For a set of configurations
(the uniform (W, A) sweep plus random mixed configurations of the search space), this
scores every configuration ONCE on every image (one logits pass per configuration) and
reports, per fitness-set size (stratified subsets of the training split) and per label
source (the true labels, or the float model's top-1: label-free fidelity):

* the mean binomial standard error of top-1, ``sqrt(p (1 - p) / n)``, in points;
* Spearman and Kendall rank correlation with the configurations' top-1 on the test split
  (the held-out reference), over all configurations and over the useful ones (test top-1
  within 10 points of float);
* the rank agreement of per-quantizer sensitivities (each quantizer alone at 2 and 4 bits,
  the rest at 8) between the fitness images and the test images.

    python experiments/fitness_noise.py [--config ...] [--random 64] [--out results/noise]

Writes ``noise.json`` (every figure) and ``configs.csv`` (every configuration's scores) to
``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

import nemo_jax
from nemo_jax import data as data_lib
from nemo_jax import evaluation

SIZES_PER_CLASS = (10, 25, 50, 100)


def logits_fn(problem):
  model, scheme = problem.model, problem.scheme
  return jax.jit(lambda prepared, config, x: evaluation.member_apply_fn(
      model, scheme, prepared, config)(x))


def predictions(problem, fn, configs, images, batch: int = 500) -> np.ndarray:
  """``[P, N]`` top-1 class of every configuration on every image."""
  prepared = problem.evaluator.prepared
  out = []
  for i in range(len(configs.keep)):
    one = jax.tree.map(lambda x: x[i], configs)
    rows = [np.asarray(jnp.argmax(fn(prepared, one, jnp.asarray(images[s:s + batch])), -1))
            for s in range(0, len(images), batch)]
    out.append(np.concatenate(rows))
  return np.stack(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=None, help="search config (default: the embedded one)")
  p.add_argument("--random", type=int, default=64, help="random mixed configurations")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="results/noise")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  cfg = nemo_jax.load_search_config(args.config)
  problem = nemo_jax.build_problem(cfg, progress=False)
  pc, wl, space = problem.cfg, problem.workload, problem.space
  rng = np.random.default_rng(args.seed)
  K = len(pc.bit_choices)
  n_act = len(space.active_nodes)
  # The uniform (W, A) sweep and random mixed configurations, as choice indices.
  kinds = space.active_kinds
  sweep = [np.where(kinds == 1, w, a) for w in range(K) for a in range(K)]
  mixed = [rng.integers(0, K, n_act) for _ in range(args.random)]
  # "Near uniform" mixed configurations: a uniform level with a few quantizers moved.
  near = []
  for _ in range(args.random):
    row = np.full(n_act, rng.integers(1, K))
    moved = rng.choice(n_act, size=max(1, n_act // 8), replace=False)
    row[moved] = np.clip(row[moved] + rng.integers(-2, 3, len(moved)), 0, K - 1)
    near.append(row)
  choice = np.stack(sweep + mixed + near).astype(np.int32)
  keep_idx = np.full(len(choice), len(pc.keep_choices) - 1, np.int32)
  configs = problem.decode(jnp.asarray(choice), jnp.asarray(keep_idx))
  fp32 = problem.configs([1.0], [[32] * wl.num_layers], [[32] * wl.num_act_quantizers])
  fn = logits_fn(problem)

  def split(name):
    images, labels = data_lib.load_split(pc.dataset, name, source_dir=pc.data_dir)
    return data_lib.preprocess(pc.dataset, images), np.asarray(labels)

  x_train, y_train = split(pc.eval_split)
  x_test, y_test = split(cfg.final_split or "test")
  if problem.held_out is not None:   # fitness images come from the training images only
    train = data_lib.held_out_split(y_train, *problem.held_out)[0]
    x_train, y_train = x_train[train], y_train[train]
  # Fitness sets: nested stratified subsets of the training split (the largest drawn
  # once, smaller ones its prefixes per class: the same images grow).
  largest = data_lib.stratified_subset(y_train, max(SIZES_PER_CLASS), seed=args.seed + 100)
  x_fit, y_fit = np.asarray(x_train[largest]), np.asarray(y_train[largest])
  pred_fit = predictions(problem, fn, configs, x_fit)
  pred_test = predictions(problem, fn, configs, x_test)
  float_fit = predictions(problem, fn, fp32, x_fit)[0]
  float_test = predictions(problem, fn, fp32, x_test)[0]
  test_top1 = (pred_test == y_test[None]).mean(1)
  float_test_top1 = float((float_test == y_test).mean())
  useful = test_top1 >= float_test_top1 - 0.10

  rows = []
  order = {c: np.nonzero(y_fit == c)[0] for c in np.unique(y_fit)}
  for per_class in SIZES_PER_CLASS:
    idx = np.sort(np.concatenate([v[:per_class] for v in order.values()]))
    for source, labels in (("true", y_fit[idx]), ("float", float_fit[idx])):
      top1 = (pred_fit[:, idx] == labels[None]).mean(1)
      se = np.sqrt(top1 * (1 - top1) / len(idx))
      row = {"per_class": per_class, "images": int(len(idx)), "labels": source,
             "mean_se_points": round(100 * float(se.mean()), 3),
             "mean_se_points_useful": round(100 * float(se[useful].mean()), 3)}
      for name, mask in (("all", np.ones_like(useful)), ("useful", useful)):
        row[f"spearman_{name}"] = round(float(stats.spearmanr(top1[mask],
                                                              test_top1[mask])[0]), 4)
        row[f"kendall_{name}"] = round(float(stats.kendalltau(top1[mask],
                                                              test_top1[mask])[0]), 4)
      rows.append(row)

  # Sensitivity rank agreement: each quantizer alone at 2 and 4 bits on fitness vs test.
  probes, nodes, bits = evaluation.sensitivity_probes(problem, 8)
  keep = np.isin(bits, [2, 4])
  sel = np.concatenate([np.nonzero(keep)[0], [len(bits)]])
  probes = jax.tree.map(lambda x: x[sel], probes)
  pf = predictions(problem, fn, probes, x_fit[np.sort(np.concatenate(
      [v[:25] for v in order.values()]))])
  pt = predictions(problem, fn, probes, x_test)
  idx25 = np.sort(np.concatenate([v[:25] for v in order.values()]))
  fit_top1 = (pf == y_fit[idx25][None]).mean(1)
  tst_top1 = (pt == y_test[None]).mean(1)
  sens = {}
  for b in (2, 4):
    m = bits[keep] == b
    drop_fit = fit_top1[-1] - fit_top1[:-1][m]
    drop_test = tst_top1[-1] - tst_top1[:-1][m]
    sens[f"{b}_bits"] = {"spearman": round(float(stats.spearmanr(drop_fit, drop_test)[0]), 4),
                         "kendall": round(float(stats.kendalltau(drop_fit, drop_test)[0]), 4)}

  os.makedirs(args.out, exist_ok=True)
  result = {"config": args.config or "default", "configs": int(len(choice)),
            "uniform": len(sweep), "random": args.random, "near_uniform": args.random,
            "useful_configs": int(useful.sum()), "test_images": int(len(y_test)),
            "float_test_top1": float_test_top1, "fitness": rows,
            "sensitivity_rank_agreement_250_vs_test": sens,
            "seconds": round(time.perf_counter() - t0, 1)}
  with open(os.path.join(args.out, "noise.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, "configs.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["kind", "mean_w_bits", "mean_a_bits", "test_top1"]
               + [f"fit{pc}_top1" for pc in SIZES_PER_CLASS])
    for i in range(len(choice)):
      kind = "uniform" if i < len(sweep) else ("random" if i < len(sweep) + args.random
                                               else "near_uniform")
      fits = [float((pred_fit[i, np.sort(np.concatenate([v[:k] for v in order.values()]))]
                     == y_fit[np.sort(np.concatenate([v[:k] for v in order.values()]))]).mean())
              for k in SIZES_PER_CLASS]
      w.writerow([kind, float(np.mean(np.asarray(configs.w_bits[i]))),
                  float(np.mean(np.asarray(configs.a_bits[i]))), float(test_top1[i])] + fits)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
