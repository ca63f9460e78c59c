"""Repository contracts: the README's commands, CI, packaging, the extension example."""

from __future__ import annotations

import os
import re
import runpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
  text = open(os.path.join(REPO, "README.md")).read()
  block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
  return [l for l in block.splitlines() if l and not l.startswith("#")]


def test_ci_runs_the_readme_test_command_verbatim():
  main_job, test_cmd = _readme_commands()[:2]
  assert "nemo-jax search" in main_job and "pytest" in test_cmd
  ci = open(os.path.join(REPO, ".ci", "run")).read().splitlines()
  assert test_cmd in ci


def test_package_ships_data_checkpoint_and_licence():
  assets = os.path.join(REPO, "nemo_jax", "assets")
  for f in ("fashion_mnist_subset.npz", "FASHION_MNIST_LICENSE.txt",
            "resnet20_fashion_mnist.msgpack", "resnet20_fashion_mnist.json"):
    assert os.path.exists(os.path.join(assets, f)), f
  size = sum(os.path.getsize(os.path.join(assets, f)) for f in os.listdir(assets))
  assert size < 10 * 2**20
  assert '"assets/*"' in open(os.path.join(REPO, "pyproject.toml")).read()


def test_custom_objective_and_species_example_runs():
  mod = runpy.run_path(os.path.join(REPO, "experiments", "custom_objective_and_species.py"))
  result = mod["main"](["--generations", "1"])
  assert result.front
  assert set(result.front[0]["objectives"]) == {"top1_error", "latency_ms", "model_ratio"}
  assert {m["species"] for m in result.front} <= {"direct_round", "all_same"}
