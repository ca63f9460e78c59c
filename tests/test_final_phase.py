"""The final phase and compiles: streamed evaluation through the generation's compiled
shape, one final-phase compile at most, warm generations (nemo_jax/_src/evaluator.py,
nemo_jax/_src/run/search.py, nemo_jax/_src/run/final.py)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from nemo_jax._src.run import final as final_lib
from nemo_jax._src.run import search as run_lib
from nemo_jax._src.run.config import load_search_config
from nemo_jax._src.run.rundir import CONFIG_FILE
from tests.conftest import SMOKE



def _random_configs(problem, count, seed):
  rng = np.random.default_rng(seed)
  choice = rng.integers(0, len(problem.cfg.bit_choices),
                        (count, len(problem.space.active_nodes))).astype(np.int32)
  keep_idx = rng.integers(0, len(problem.cfg.keep_choices), (count,)).astype(np.int32)
  return problem.decode(np.asarray(choice), np.asarray(keep_idx))


def test_streamed_blocks_equal_a_resident_evaluator_and_compile_nothing_new(smoke_problem):
  p = smoke_problem
  ev = p.evaluator
  sets = final_lib.report_sets(p, load_search_config(SMOKE))
  x, y = final_lib.materialise(sets["final_top1"])   # 40 test images; the fitness block: 20
  assert len(y) % ev.block_images != 0 or len(y) > ev.block_images
  x, y = x[:37], y[:37]          # a short last block (padded and masked)
  configs = _random_configs(p, 5, seed=1)
  size = p.evaluator.padded_size(p.population)
  ev.run(configs, pad_to=size)   # the generation's compiled shape
  before = ev.compiled_sizes()
  streamed = ev.run_images(configs, x, y, pad_to=size)
  assert ev.compiled_sizes() == before
  resident = p.make_evaluator(x, y).run(configs)   # the whole set in one block
  np.testing.assert_array_equal(streamed.top1, resident.top1)
  np.testing.assert_array_equal(streamed.top5, resident.top5)
  np.testing.assert_allclose(streamed.loss, resident.loss, rtol=1e-5)
  # A lazy source (slicing only) with per-block preprocessing gives the same.
  class Lazy:
    def __len__(self):
      return len(y)
    def __getitem__(self, s):
      return x[s] * 2.0
  lazy = ev.run_images(configs, Lazy(), y, preprocess=lambda b: b / 2.0, pad_to=size,
                       prefetch=2)
  np.testing.assert_array_equal(lazy.top1, streamed.top1)
  with pytest.raises(ValueError, match="labels"):
    ev.run_images(configs, x, np.full(len(y), 99), pad_to=size)
  with pytest.raises(ValueError, match="pad_to"):
    ev.run(configs, pad_to=3)


def test_final_size_pads_to_a_small_multiple():
  class P:
    class evaluator:
      num_devices = 1
  assert [final_lib.final_size(P, m) for m in (1, 7, 8, 9, 27, 45)] == [8, 8, 8, 16, 32, 48]
  P.evaluator.num_devices = 2
  assert final_lib.final_size(P, 17) == 32


def test_no_compile_after_generation_0_and_the_cache_answers_repeats(smoke_problem):
  # propose / select compile beside generation 0 (Engine.precompile), the evaluator's
  # padding is built on the host and repeated configurations come from the cache: JAX's
  # compile events count no XLA compilation in generations 1, 2, ...
  res = run_lib.search(SMOKE, out_dir=None, progress=False, problem=smoke_problem,
                       generations=4, final_split=None, selection_per_class=0)
  compiles = [r["compiles"] for r in res.history]
  assert compiles[0] > 0 and compiles[1:] == [0, 0, 0, 0], compiles
  assert all(r["compile_seconds"] == 0.0 for r in res.history[1:])
  # Every repeat was answered by the cache: the unique evaluations were scored once.
  hits = sum(r["cache_hits"] for r in res.history)
  assert res.timing["cache_hits"] == hits and hits > 0
  assert smoke_problem.cache.misses + smoke_problem.cache.hits >= res.history[-1]["evaluations"]


def test_the_cache_returns_the_evaluators_scores_bit_for_bit(smoke_problem):
  p = smoke_problem
  configs = _random_configs(p, 6, seed=3)
  fresh = p.evaluator.run(configs)
  cached = p.accuracy(configs)        # evaluated (or looked up) through the cache
  again = p.accuracy(configs)         # now certainly from the cache
  np.testing.assert_array_equal(cached["top1_error"], 1.0 - np.asarray(fresh.top1, np.float64))
  np.testing.assert_array_equal(again["top1_error"], cached["top1_error"])
  np.testing.assert_array_equal(again["top5_error"], 1.0 - np.asarray(fresh.top5, np.float64))
  # Duplicates inside one batch are evaluated once.
  import jax
  doubled = jax.tree.map(lambda x: np.concatenate([np.asarray(x)] * 2), configs)
  misses = p.cache.misses
  out = p.accuracy(doubled)
  assert p.cache.misses == misses
  np.testing.assert_array_equal(out["top1_error"], np.tile(again["top1_error"], 2))


def test_search_compiles_each_generation_function_once_and_records_timing(tmp_path,
                                                                          smoke_problem):
  # Generations 1..3 run the same propose / select executables: compiled once, ahead,
  # for the state's canonical shapes (Engine.precompile).
  from nemo_jax._src.search import engine as engine_lib
  engines = []
  original = engine_lib.Engine.__init__

  def spy(self, *a, **k):
    original(self, *a, **k)
    engines.append(self)

  engine_lib.Engine.__init__ = spy
  try:
    res = run_lib.search(SMOKE, out_dir=str(tmp_path), progress=False,
                         problem=smoke_problem, generations=3)
  finally:
    engine_lib.Engine.__init__ = original
  (engine,) = engines
  assert isinstance(engine.propose, jax.stages.Compiled)
  assert isinstance(engine.select, jax.stages.Compiled)
  # Generations and the final phase: the generation's size (8) and at most one more.
  assert len(smoke_problem.evaluator.compiled_sizes()) <= 2
  # ... each traced once: generations' batches and the streamed final blocks share it.
  assert all(fn._cache_size() == 1 for fn in smoke_problem.evaluator._compiled.values())
  assert all("compile_seconds" in r for r in res.history)
  timing = json.load(open(os.path.join(tmp_path, CONFIG_FILE)))["timing"]
  assert {"setup_seconds", "search_seconds", "final_seconds", "final_compile_seconds",
          "search_compile_seconds", "final_population", "output_seconds",
          "total_seconds", "cache_hits"} <= set(timing)
  assert timing["total_seconds"] >= timing["search_seconds"] + timing["final_seconds"]
  assert timing["final_population"] % final_lib.FINAL_PAD == 0
  assert all(0.0 <= m["final_top1"] <= 1.0 for m in res.front + res.uniform)
  # The final front's hypervolume per image set: in sample it is the archive's.
  saved = json.load(open(os.path.join(tmp_path, CONFIG_FILE)))["final_hypervolume"]
  assert set(res.hypervolume) == {"fitness", "selection", "test"} and saved == res.hypervolume
  assert res.hypervolume["fitness"] == pytest.approx(res.history[-1]["hypervolume"], abs=1e-5)
  assert all(0.0 < v < 1.0 for v in res.hypervolume.values())
