"""Per-quantizer sensitivity (nemo_jax/_src/run/sensitivity.py)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import nemo_jax
from nemo_jax._src.run import sensitivity as sens_lib
from tests.conftest import SMOKE


@pytest.fixture(scope="module")
def problem():
  # Two bit choices below the base keep the batch small: 44 nodes x 2 + 1 configs.
  return nemo_jax.build_problem(nemo_jax.load_search_config(SMOKE, bit_choices=[2, 4, 8]),
                                progress=False)


def test_the_batch_equals_each_configuration_evaluated_alone(problem, tmp_path, monkeypatch):
  monkeypatch.setenv("NEMO_JAX_CACHE_DIR", str(tmp_path / "cache"))
  table = sens_lib.load_or_compute(problem, base_bits=8)
  active = problem.space.active_nodes
  assert table["bits"] == [2, 4] and len(table["nodes"]) == len(active)
  assert np.shape(table["top1"]) == (len(active), 2)
  assert set(table["kinds"]) == {"w", "a"}
  configs, nodes, bits = sens_lib.probe_configs(problem, 8)
  # A fresh evaluator (no cache): a few probes one by one, and the base.
  ev = problem.make_evaluator(*_fitness(problem))
  for k in (0, 1, len(nodes) // 2, len(nodes) - 1):
    one = jax.tree.map(lambda x: x[k:k + 1], configs)
    alone = float(ev.run(one).top1[0])
    i, j = list(active).index(int(nodes[k])), table["bits"].index(int(bits[k]))
    assert table["top1"][i][j] == pytest.approx(alone, abs=0)
    # The probe changes exactly one node: its bits, the rest at the base.
    w = np.asarray(one.w_bits)[0]
    a = np.asarray(one.a_bits)[0]
    assert sorted(set(w.tolist()) | set(a.tolist())) in ([int(bits[k]), 8], [8])
  base = jax.tree.map(lambda x: x[-1:], configs)
  assert table["base_top1"] == pytest.approx(float(ev.run(base).top1[0]), abs=0)
  np.testing.assert_allclose(np.asarray(table["drop"]),
                             table["base_top1"] - np.asarray(table["top1"]))
  # Cached by fingerprint: a second call reads the file (no evaluation).
  misses = problem.cache.misses
  again = sens_lib.load_or_compute(problem, base_bits=8)
  assert again == table and problem.cache.misses == misses
  cached = [f for f in os.listdir(tmp_path / "cache" / "calibration")
            if f.endswith(".sensitivity.json")]
  assert len(cached) == 1
  # Files and the text table.
  json_path, png = sens_lib.write(str(tmp_path / "out"), table)
  assert json.load(open(json_path))["nodes"] == table["nodes"] and os.path.getsize(png) > 0
  text = sens_lib.format_table(table, rows=5)
  assert sens_lib.ranking(table)[0][0] in text


def _fitness(problem):
  from nemo_jax._src.problem import fitness_data
  x, y, _ = fitness_data(problem.cfg, problem.seed, 0, problem.data, problem.held_out)
  return x, y


def test_bad_base_is_an_error(problem):
  with pytest.raises(ValueError, match="base_bits=2 is invalid"):
    sens_lib.compute(problem, base_bits=2)
