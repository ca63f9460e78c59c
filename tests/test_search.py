"""The NEMO engine: allocation, joint ranking, archive, decoding, CLI, resume, determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemo_jax import pareto
from nemo_jax._src.problem import SearchSpace
from nemo_jax._src.run import search as run_lib
from nemo_jax._src.run.config import load_search_config
from nemo_jax._src.search import engine as engine_lib
from nemo_jax._src.search import species as species_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "configs", "smoke.py")


# --------------------------------------------------------------------------- allocation

@hypothesis.settings(deadline=None, max_examples=40)
@hypothesis.given(st.data())
def test_allocation_sums_to_population_and_respects_bounds(data):
  s = data.draw(st.integers(1, 6))
  min_size = data.draw(st.integers(2, 4))
  total = data.draw(st.integers(s * min_size, s * min_size + 30))
  capacity = total - (s - 1) * min_size
  # Old sizes: any valid allocation of `total`.
  extra = data.draw(st.lists(st.integers(0, 30), min_size=s, max_size=s))
  old = np.full(s, min_size)
  rest = total - s * min_size
  for i in range(s):
    take = min(extra[i], rest)
    old[i] += take
    rest -= take
  old[0] += rest
  value = np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=s, max_size=s)), np.float32)
  evals = np.asarray(data.draw(st.lists(st.integers(1, 500), min_size=s, max_size=s)))
  sizes = np.asarray(engine_lib.allocate_sizes(jnp.asarray(value), jnp.asarray(evals),
                                               jnp.asarray(old, jnp.int32), total, min_size,
                                               capacity, 0.5))
  assert sizes.sum() == total
  assert (sizes >= min_size).all()
  assert (sizes <= np.minimum(2 * old, capacity)).all()
  uncapped = np.asarray(engine_lib.allocate_sizes(jnp.asarray(value), jnp.asarray(evals),
                                                  jnp.asarray(old, jnp.int32), total, min_size,
                                                  capacity, 0.5, None))
  assert uncapped.sum() == total and (uncapped >= min_size).all()
  assert (uncapped <= capacity).all()


def test_allocation_favours_the_better_species():
  sizes = engine_lib.allocate_sizes(jnp.array([1.0, 0.0, 0.0, 0.0]), jnp.array([10, 10, 10, 10]),
                                    jnp.array([8, 8, 8, 8], jnp.int32), 32, 4, 20, 0.0)
  # Species 0 grows to its cap (2 x 8); the other slots are shared out one by one.
  assert list(np.asarray(sizes)) == [16, 6, 5, 5]


# --------------------------------------------------------------------------- ranking

def _brute_rank(F):
  n = len(F)
  dom = lambda a, b: np.all(a <= b) and np.any(a < b)
  rank = np.full(n, -1)
  left = set(range(n))
  r = 0
  while left:
    front = {i for i in left if not any(dom(F[j], F[i]) for j in left if j != i)}
    for i in front:
      rank[i] = r
    left -= front
    r += 1
  return rank


def _engine(problem, **overrides):
  cfg = load_search_config(SMOKE, **overrides)
  return run_lib.make_engine(cfg, problem)


@pytest.mark.parametrize("selection", ["nsga3", "nsga2"])
def test_joint_priority_orders_fronts_and_puts_invalid_last(smoke_problem, selection):
  engine = _engine(smoke_problem, selection=selection)
  rng = np.random.default_rng(0)
  n = 40  # pooled candidates (any count: the order is for k = population survivors)
  F = rng.integers(0, 5, size=(n, 3)).astype(np.float32)
  valid = rng.random(n) > 0.2
  violation = np.where(rng.random(n) < 0.8, 0.0, 0.5).astype(np.float32)
  pri, rank = jax.jit(engine._rank_and_priority)(jnp.asarray(F), jnp.asarray(violation),
                                                 jnp.asarray(valid))
  pri, rank = np.asarray(pri), np.asarray(rank)
  assert sorted(pri[valid].tolist()) == list(range(valid.sum()))  # a total order
  assert (pri[~valid] == np.iinfo(np.int32).max).all()            # dead slots last
  order = np.argsort(pri)[:valid.sum()]
  assert np.all(np.diff(rank[order]) >= 0)                        # fronts come in order
  feasible = violation <= 0
  np.testing.assert_array_equal(rank[valid & feasible], _brute_rank(F[valid & feasible]))
  assert rank[valid & feasible].max() < rank[valid & ~feasible].min()  # Deb's domination
  # The population best are exactly the toolkit's survivors of the pooled candidates.
  k = engine.cfg.population
  assert valid.sum() > k
  if selection == "nsga3":
    survivors = pareto.nsga3_select(F, k, engine.ref_dirs, valid, violation)
  else:
    survivors = pareto.nsga2_select(F, k, valid, violation)
  assert set(np.flatnonzero(pri < k).tolist()) == set(np.asarray(survivors).tolist())


def test_nsga2_priority_breaks_ties_by_crowding():
  # One front on a line: the two extremes (infinite crowding) come first.
  F = jnp.asarray([[0.0, 4.0], [1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [4.0, 0.0]])
  pri = pareto.nsga2_priority(F, violation=jnp.zeros(5))
  assert set(np.argsort(np.asarray(pri))[:2].tolist()) == {0, 4}


# --------------------------------------------------------------------------- archive

def _rows(keys, F, pad_to=24):
  # Padded to a fixed number of rows (valid=False) so every example shares one compile.
  n = len(keys)
  pad = lambda x, v=0: np.concatenate([x, np.full((pad_to - n,) + x.shape[1:], v, x.dtype)])
  keys = pad(np.asarray(keys, np.int32))
  F = pad(np.asarray(F, np.float32))
  return engine_lib.Archive(
      key=jnp.asarray(keys), choice=jnp.asarray(keys), keep_idx=jnp.zeros(pad_to, jnp.int32),
      F=jnp.asarray(F), violation=jnp.zeros(pad_to, jnp.float32), raw=jnp.asarray(F),
      species=jnp.zeros(pad_to, jnp.int32), generation=jnp.zeros(pad_to, jnp.int32),
      valid=jnp.asarray(np.arange(pad_to) < n))


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1,
                           max_size=24))
def test_archive_keeps_distinct_nondominated_configs(points):
  # key = the point itself, so equal keys have equal objectives (as in a real search).
  keys = np.asarray(points)
  F = keys.astype(np.float32)
  empty = jax.tree.map(lambda x: jnp.zeros((32,) + x.shape[1:], x.dtype), _rows(keys, F))
  out = engine_lib.update_archive(empty, _rows(keys, F))
  got = {tuple(k) for k, v in zip(np.asarray(out.key), np.asarray(out.valid)) if v}
  distinct = np.unique(keys, axis=0)
  rank = _brute_rank(distinct.astype(np.float32))
  want = {tuple(k) for k, r in zip(distinct, rank) if r == 0}
  assert got == want


# --------------------------------------------------------------------------- species protocol

def test_ga_group_asks_offspring_and_tells_the_ranked_keep():
  # Genomes [S_g=2, C=3, 1] hold their own slot ids, so what tell keeps is visible.
  parents = jnp.arange(6, dtype=jnp.float32).reshape(2, 3, 1)
  group = species_lib.ga_group(
      "toy", (0, 1), init=lambda key: parents,
      vary=lambda key, p, priority, sizes: p + 100.0 + priority[..., None],
      decode=lambda g: (g.astype(jnp.int32), jnp.zeros(g.shape[:2], jnp.int32)))
  state, genomes = group.init(jax.random.key(0))
  np.testing.assert_array_equal(state, parents)
  np.testing.assert_array_equal(genomes, parents)
  priority = jnp.asarray([[2, 0, 1], [0, 1, 2]], jnp.int32)
  offspring, state = group.ask(jax.random.key(1), state, priority, jnp.asarray([3, 3]))
  np.testing.assert_array_equal(state, parents)             # asking leaves the parents
  np.testing.assert_array_equal(offspring[..., 0], [[102, 101, 103], [103, 105, 107]])
  keep = jnp.asarray([[4, 0, 5], [1, 2, 3]], jnp.int32)    # indices into parents ++ offspring
  info = species_lib.TellInfo(keep_order=keep, F=jnp.zeros((2, 3, 2)),
                              violation=jnp.zeros((2, 3)), alive=jnp.ones((2, 3), bool))
  kept = group.tell(jax.random.key(2), state, offspring, info)
  np.testing.assert_array_equal(kept[..., 0], [[101, 0, 103], [4, 5, 103]])


def test_evosax_fitness_masks_dead_and_non_finite_members():
  info = species_lib.TellInfo(
      keep_order=jnp.zeros((1, 3), jnp.int32),
      F=jnp.asarray([[[0.2, 0.4], [jnp.nan, 0.1], [0.3, 0.1]]]),
      violation=jnp.asarray([[0.0, 0.0, 0.5]]), alive=jnp.asarray([[True, True, False]]))
  fit = np.asarray(species_lib.evosax_fitness(info, 4))
  np.testing.assert_allclose(fit, [0.2, species_lib.BIG, species_lib.BIG, species_lib.BIG])


# --------------------------------------------------------------------------- problem

def test_decode_maps_choices_to_node_bits(smoke_problem):
  p = smoke_problem
  n_layers = p.workload.num_layers
  choice = jnp.asarray(np.arange(2 * n_layers) % 7)[None]
  cfg = p.decode(choice, jnp.zeros((1,), jnp.int32))
  bits = np.asarray(p.bit_choices)[np.arange(2 * n_layers) % 7]
  np.testing.assert_array_equal(np.asarray(cfg.a_bits[0]), bits[0::2])   # nodes a_0, w_0, ...
  np.testing.assert_array_equal(np.asarray(cfg.w_bits[0]), bits[1::2])
  assert float(cfg.keep[0]) == 1.0


def test_objectives_are_normalised_and_minimised(smoke_problem):
  p = smoke_problem
  L = p.workload.num_layers
  choice = jnp.stack([jnp.full((2 * L,), 6), jnp.full((2 * L,), 0)])   # W8A8 and W2A2
  F, viol, raw = p.objectives(p.decode(choice, jnp.zeros((2,), jnp.int32)))
  names = list(p.objective_names)
  bops = F[:, names.index("bops_ratio")]
  np.testing.assert_allclose(bops, [1 / 16, 1 / 256], rtol=1e-5)
  assert F[0, names.index("top1_error")] < F[1, names.index("top1_error")]  # 8 bit beats 2 bit
  assert (viol == 0).all()
  np.testing.assert_allclose(raw["top1_error"], F[:, 0])


# --------------------------------------------------------------------------- end to end

def _cli(*args, **kwargs):
  return subprocess.run([sys.executable, "-m", "nemo_jax.cli", *args], capture_output=True,
                        text=True, cwd=REPO, timeout=900, **kwargs)


def test_cli_search_report_and_bad_config(tmp_path):
  out = tmp_path / "run"
  r = _cli("search", "--config", SMOKE, "--out", str(out), "--quiet")
  assert r.returncode == 0, r.stderr
  for f in ("config.json", "front.json", "history.csv", "front.png", "species.png",
            "uniform.json"):
    assert (out / f).exists(), f
  front = json.loads((out / "front.json").read_text())
  assert front and {"w_bits", "a_bits", "keep", "species", "objectives"} <= set(front[0])
  assert set(front[0]["objectives"]) == {"top1_error", "model_ratio", "bops_ratio"}
  uniform = json.loads((out / "uniform.json").read_text())
  for m in front + uniform:   # the selection set (held-out train images) and the test set
    assert 0 <= m["selection_top1"] <= 1 and 0 <= m["final_top1"] <= 1
  history = (out / "history.csv").read_text().splitlines()
  assert len(history) == 1 + 3                      # header + generations 0..2
  os.remove(out / "front.png")
  r = _cli("report", str(out))
  assert r.returncode == 0 and (out / "front.png").exists()
  assert "top1_error" in r.stdout and "selection_top1" in r.stdout

  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"population": 8, "generations": 1, "colour": "red"}))
  r = _cli("search", "--config", str(bad), "--out", str(tmp_path / "bad"))
  assert r.returncode == 2 and "colour" in r.stderr and "Traceback" not in r.stderr
  bad.write_text(json.dumps({"selection": "nsga4"}))
  r = _cli("search", "--config", str(bad), "--out", str(tmp_path / "bad"))
  assert r.returncode == 2 and "nsga3" in r.stderr and "Traceback" not in r.stderr


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
  generations = 8
  reference = run_lib.search(SMOKE, out_dir=str(tmp_path / "ref"), progress=False,
                             generations=generations)
  # Same seed, same machine: identical results (determinism).
  again = run_lib.search(SMOKE, out_dir=None, progress=False, generations=generations)
  assert again.front == reference.front

  out = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "nemo_jax.cli", "search", "--config", SMOKE,
                           "--out", str(out), "--generations", str(generations), "--quiet"],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = out / "checkpoints"
  deadline = time.time() + 600
  killed_at = None
  while time.time() < deadline and proc.poll() is None:
    steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if ckpt.exists() else []
    if steps and max(steps) >= 2:
      proc.send_signal(signal.SIGKILL)
      killed_at = max(steps)
      break
    time.sleep(0.02)
  proc.wait(timeout=60)
  assert killed_at is not None and killed_at < generations, "the run ended before the kill"
  assert not (out / "front.json").exists()
  r = _cli("search", "--resume", str(out), "--quiet")
  assert r.returncode == 0, r.stderr
  assert json.loads((out / "front.json").read_text()) == json.loads(
      (tmp_path / "ref" / "front.json").read_text())
  assert (out / "history.csv").read_text().count("\n") == generations + 2


def test_nsga2_random_and_evosax_species_run(smoke_problem):
  # One engine covering NSGA-II selection, the random species and evosax strategies
  # (distribution-based on direct genes, population-based on GNN weights).
  species = ["direct_round", "random",
             {"kind": "direct_floor", "optimizer": "evosax:Open_ES"},
             {"kind": "gcn", "hidden": 8, "optimizer": "evosax:SimpleGA"}]
  res = run_lib.search(SMOKE, out_dir=None, progress=False, problem=smoke_problem,
                       species=species, selection="nsga2", resize=False, generations=2,
                       final_split=None)
  assert [r["evaluations"] for r in res.history] == [8, 16, 24]
  assert res.front and all(m["species"] in ("direct_round", "random", "direct_floor", "gcn")
                           for m in res.front)
  sizes = {k: v for k, v in res.history[-1].items() if k.startswith("size:")}
  assert set(sizes.values()) == {2}                       # resize=False keeps sizes


def test_experiment_configs_validate():
  cfg_dir = os.path.join(REPO, "experiments", "configs")
  names = [f for f in os.listdir(cfg_dir) if f.endswith(".py") and not f.startswith("train")]
  assert {"default.py", "smoke.py"} <= set(names)
  for f in names:
    load_search_config(os.path.join(cfg_dir, f))
  for model in ("mobilenet_v2", "resnet50", "resnext101_32x8d"):
    cfg = load_search_config(os.path.join(cfg_dir, f"paper_imagenet.py:{model}"))
    assert cfg.model == model and cfg.eval_per_class == 5 and "top5_error" in cfg.objectives
    assert cfg.placement == "nncf"                        # the paper's quantizer placement
  with pytest.raises(ValueError, match="objectives"):
    load_search_config(SMOKE, objectives=["top1_error", "latency"])
  with pytest.raises(ValueError, match="population"):
    load_search_config(SMOKE, population=3)
  with pytest.raises(ValueError, match="node_features"):
    load_search_config(SMOKE, node_features=["in_channels", "colour"])
  cfg = load_search_config(SMOKE, node_features=["in_channels", "stride"], edges="dataflow")
  assert cfg.node_features == ("in_channels", "stride")


# --------------------------------------------------------------------------- species options

def _tiny_graph(n=6, features=3):
  import jraph
  rng = np.random.default_rng(0)
  return jraph.GraphsTuple(nodes=rng.normal(size=(n, features)).astype(np.float32), edges=None,
                           globals=None, senders=np.arange(n - 1, dtype=np.int32),
                           receivers=np.arange(1, n, dtype=np.int32),
                           n_node=np.array([n], np.int32), n_edge=np.array([n - 1], np.int32))


def test_species_options_validate():
  # (a parameter of another kind: the error names the kind and its own parameters)
  bad = [({"kind": "direct_round", "heads": 2},
          r"species\[0\]\.heads: not a parameter of kind 'direct_round'"),
         ({"kind": "gcn", "depth": 2}, r"species\[0\]\.depth: not a parameter of kind 'gcn'"),
         ({"kind": "graph_unet", "pool_ratio": 1.5}, r"species\[0\]\.pool_ratio"),
         ({"kind": "graph_unet", "heads": 0}, r"species\[0\]\.heads"),
         ({"kind": "gcn", "output_selu": "yes"}, r"species\[0\]\.output_selu"),
         ({"kind": "gcn", "seed_uniform": True}, r"species\[0\]\.seed_uniform"),
         ({"kind": "direct_round", "seed_uniform": True, "optimizer": "evosax:CMA_ES"},
          r"species\[0\]\.seed_uniform")]
  for spec, match in bad:
    with pytest.raises(ValueError, match=match):
      load_search_config(SMOKE, species=[spec])
  cfg = load_search_config(SMOKE, species=[
      {"kind": "graph_unet", "depth": 2, "heads": 2, "pool_ratio": 0.6, "output_selu": True},
      {"kind": "direct_floor", "seed_uniform": True}])
  s = cfg.flat_dict()["species"][0]
  assert (s["depth"], s["heads"], s["pool_ratio"], s["output_selu"]) == (2, 2, 0.6, True)


def test_gnn_species_options_reach_the_policy():
  from nemo_jax._src.search import policies
  graph = _tiny_graph()
  cfg = load_search_config(SMOKE, population=8, min_species_size=2, species=[
      {"kind": "graph_unet", "hidden": 4, "depth": 2, "heads": 2, "pool_ratio": 0.6,
       "output_selu": True},
      {"kind": "graph_unet", "hidden": 4},
      {"kind": "gcn", "hidden": 4, "heads": 3}])
  space = SearchSpace(num_nodes=6, active_nodes=tuple(range(6)), num_choices=7, num_keep=1)
  groups = species_lib.build_groups(cfg.search.species, space, 4, graph, 3,
                                    species_lib.BUILTIN_SPECIES)
  assert [g.species for g in groups] == [(0,), (1,), (2,)]   # different structures
  _, genomes = groups[0].init(jax.random.key(0))
  params = jax.tree.map(lambda x: x[0, 1], genomes["policy"])
  assert "unet_down_2" in params and params["gat"]["a_src"].shape == (2, 4)
  reference = policies.graph_unet_policy(hidden=4, n_choices=7, depth=2, pool_ratio=0.6,
                                         heads=2, output_selu=True)
  logits = reference.apply(params, graph)
  choice, _ = groups[0].decode(genomes)
  np.testing.assert_array_equal(np.asarray(choice[0, 1]), np.argmax(np.asarray(logits), -1))
  _, genomes = groups[2].init(jax.random.key(0))
  assert genomes["policy"]["gat"]["a_src"].shape[2:] == (3, 4)


def test_seed_uniform_direct_species_starts_with_uniform_configs():
  cfg = load_search_config(SMOKE, population=16, min_species_size=2, species=[
      {"kind": "direct_round", "seed_uniform": True}, {"kind": "direct_floor"},
      {"kind": "direct_floor", "seed_uniform": True}, "direct_round"])
  space = SearchSpace(num_nodes=10, active_nodes=tuple(range(10)), num_choices=7,
                      num_keep=1)
  init_sizes = engine_lib.initial_sizes(cfg.search)        # 4 each
  (group,) = species_lib.build_groups(cfg.search.species, space, 10, None, 1,
                                      species_lib.BUILTIN_SPECIES, init_sizes=init_sizes)
  _, genomes = group.init(jax.random.key(0))
  choice = np.asarray(group.decode(genomes)[0])             # [4 species, 10 slots, 10]
  # The 7 uniform levels dealt round-robin: no two species start with the same config.
  np.testing.assert_array_equal(choice[0, :4], np.repeat([[0], [2], [4], [6]], 10, 1))
  np.testing.assert_array_equal(choice[2, :3], np.repeat([[1], [3], [5]], 10, 1))
  assert all(len(set(row)) > 1 for row in choice[0, 4:])    # the rest random
  assert all(len(set(row)) > 1 for row in choice[2, 3:])
  for s in (1, 3):
    assert all(len(set(row)) > 1 for row in choice[s])
  fresh = np.asarray(group.decode(group.fresh(jax.random.key(1)))[0])
  assert all(len(set(row)) > 1 for row in fresh[0])         # random fill is random
