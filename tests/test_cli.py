"""The `nemo-jax` subcommands that need no search: layers, costs, train, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nemo_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(capsys, *argv):
  code = cli.main(list(argv))
  out = capsys.readouterr()
  return code, out.out, out.err


def test_layers_prints_the_workload(capsys):
  code, out, _ = _run(capsys, "layers", "resnet20")
  assert code == 0
  wl = json.loads(out)
  assert wl["num_layers"] == 22 and len(wl["layers"]) == 22


def test_costs_uniform_and_config(capsys, tmp_path):
  code, out, _ = _run(capsys, "costs", "resnet20", "--uniform", "8,8")
  assert code == 0
  c8 = json.loads(out)
  for key in ("params", "macs", "bops", "bops_ratio", "model_ratio", "size_kb", "energy",
              "layers"):
    assert key in c8
  assert set(c8["size_kb"]) == {"normal", "csr", "coo"}
  assert set(c8["energy"]) == {"X|Y", "IC|OC", "Fx|Fy", "X|Fx"}
  np.testing.assert_allclose(c8["bops_ratio"], 1 / 16, rtol=1e-6)
  cfg = tmp_path / "cfg.json"
  cfg.write_text(json.dumps({"model": "resnet20", "w_bits": [8] * 22, "a_bits": [8] * 22}))
  code, out, _ = _run(capsys, "costs", "resnet20", "--config", str(cfg), "--keep", "0.5")
  assert code == 0
  c = json.loads(out)
  assert c["bops"] == c8["bops"] and c["size_kb"]["csr"] < c8["size_kb"]["csr"]


@pytest.mark.parametrize("argv, words", [
    (["layers", "resnet21"], ["resnet21", "resnet20"]),
    (["costs", "resnet20", "--uniform", "0,8"], ["w_bits", "1..32"]),
    (["costs", "resnet20", "--uniform", "8,8", "--keep", "1.5"], ["keep", "(0, 1]"]),
    (["costs", "resnet20"], ["--config", "--uniform"]),
    (["layers", "resnet20", "--input-shape", "28,28"], ["--input-shape"]),
])
def test_bad_input_exits_2_with_a_named_field(capsys, argv, words):
  code, _, err = _run(capsys, *argv)
  assert code == 2
  assert err.startswith("error: ") and "Traceback" not in err
  for w in words:
    assert w in err


def test_config_with_wrong_length_or_bits(capsys, tmp_path):
  cfg = tmp_path / "cfg.json"
  cfg.write_text(json.dumps({"model": "resnet20", "w_bits": [8] * 21}))
  code, _, err = _run(capsys, "costs", "resnet20", "--config", str(cfg))
  assert code == 2 and "w_bits" in err and "22" in err
  cfg.write_text(json.dumps({"model": "resnet20", "a_bits": [8] * 21 + [4.5]}))
  code, _, err = _run(capsys, "costs", "resnet20", "--config", str(cfg))
  assert code == 2 and "a_bits[21]" in err and "integer" in err


def test_console_script_entry_point_reports_errors_without_traceback():
  r = subprocess.run([sys.executable, "-m", "nemo_jax.cli", "costs", "vgg19", "--uniform", "8,8"],
                     capture_output=True, text=True, cwd=REPO, timeout=300)
  assert r.returncode == 2 and "vgg19" in r.stderr and "Traceback" not in r.stderr
