"""EMOMC: pruned library (stage I), library search (stage II), costs, report, CLI, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemo_jax
from nemo_jax import emomc as library_lib
from nemo_jax._src import data as data_lib
from nemo_jax._src import workload as workload_lib
from nemo_jax._src.checkpoint import load_default_model
from nemo_jax._src.emomc import report as report_lib
from nemo_jax._src.layers import QContext
from nemo_jax._src.problem import selection_data
from nemo_jax._src.run import search as run_lib
from nemo_jax._src.run.config import load_search_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIOS = (0.4, 0.7)
# Tiny retraining so the whole file stays fast: 2 pruning steps of 1 optimizer step.
BUILD = dict(steps=2, steps_per_stage=1, batch_size=16, train_max_images=160,
             eval_max_images=40, model="resnet20", checkpoint="default",
             dataset="fashion_mnist_embedded", keep_ratios=RATIOS, schedule="chain")


def _build(out, model, variables, **overrides):
  return library_lib.build_library({**BUILD, "out_dir": out, **overrides}, model, variables,
                                   progress=False)


@pytest.fixture(scope="module")
def default_model():
  return load_default_model()


@pytest.fixture(scope="module")
def library(tmp_path_factory, default_model):
  model, variables = default_model
  out = str(tmp_path_factory.mktemp("lib") / "library")
  meta = _build(out, model, variables)
  return out, meta


def _search_config(library_dir, **overrides):
  # population 12 >= len(bit_choices): every evaluation in this file (population, uniform
  # baselines, hand checks) pads to 12 members and shares one compilation.
  d = {"library": library_dir, "keep_choices": list(RATIOS), "bit_choices": list(range(2, 13)),
       "quantize_activations": False, "activation_format": "fp16",
       "weight_quant": "symmetric_per_tensor",
       "objectives": ["top1_error", "energy:X|Y"], "constraints": {"size_kb:csr": 500.0},
       "eval_per_class": 2, "final_split": None, "population": 12, "generations": 1,
       "species": [{"kind": "direct_round"}], "selection": "nsga2", "resize": False,
       "min_species_size": 2, "archive_size": 32, "selection_per_class": 2}
  d.update(overrides)
  return load_search_config(d)


@pytest.fixture(scope="module")
def search_cfg(library):
  return _search_config(library[0])


@pytest.fixture(scope="module")
def problem(search_cfg):
  return nemo_jax.build_problem(search_cfg, progress=False)


# --------------------------------------------------------------------------- stage I


def test_keep_range_parsing():
  r = library_lib.parse_keep_range("0.2:0.8:0.01")
  assert len(r) == 61 and r[0] == 0.2 and r[-1] == 0.8 and r[37] == 0.57
  assert library_lib.parse_keep_range("0.2:0.8:0.05")[-1] == 0.8
  assert library_lib.parse_keep_range("0.5,0.3") == (0.3, 0.5)
  for bad in ("0.8:0.2:0.1", "0:0.5:0.1", "0.2:0.8", "a,b", "0.2:1.5:0.1"):
    with pytest.raises(ValueError, match="keep-range"):
      library_lib.parse_keep_range(bad)
  with pytest.raises(ValueError, match="1.2"):
    library_lib.check_keep_ratios([0.5, 1.2])


def test_library_has_exactly_the_requested_sparsity(library, default_model):
  out, meta = library
  _, variables = default_model
  assert meta["built"] == sorted(RATIOS) and meta["skipped"] == []
  assert set(library_lib.library_ratios(meta)) == set(RATIOS) | {1.0}
  dense = library_lib.kernel_leaves(variables["params"])
  for p in RATIOS + (1.0,):
    entry = library_lib.load_entry(out, p, variables)
    kernels = library_lib.kernel_leaves(entry["params"])
    assert set(kernels) == set(dense)
    for path, k in kernels.items():
      assert np.count_nonzero(k) == int(np.round(k.size * p)), (p, path)
    # Biases and BatchNorm parameters are not pruned.
    others = [np.asarray(x) for pth, x in jax.tree_util.tree_leaves_with_path(entry["params"])
              if not library_lib.is_kernel_path(pth)]
    assert sum(np.count_nonzero(x == 0) for x in others) <= sum(
        np.count_nonzero(np.asarray(x) == 0) for pth, x in
        jax.tree_util.tree_leaves_with_path(variables["params"])
        if not library_lib.is_kernel_path(pth))
    e = meta["entries"][library_lib.ratio_key(p)]
    assert 0.0 <= e["top1"] <= 1.0
    assert e["nonzero"] == sum(int(np.round(k.size * p)) for k in kernels.values())
  # The dense entry is the trained model itself.
  for x, y in zip(jax.tree.leaves(library_lib.load_entry(out, 1.0, variables)),
                  jax.tree.leaves(variables)):
    np.testing.assert_array_equal(x, np.asarray(y))


def test_build_resumes_without_redoing_finished_ratios(library, default_model, tmp_path):
  out, meta = library
  model, variables = default_model
  copy = str(tmp_path / "library")
  shutil.copytree(out, copy)
  # Simulate an interruption after 0.7 finished: 0.4 is not recorded.
  with open(os.path.join(copy, library_lib.LIBRARY_FILE)) as f:
    saved = json.load(f)
  del saved["entries"][library_lib.ratio_key(0.4)]
  with open(os.path.join(copy, library_lib.LIBRARY_FILE), "w") as f:
    json.dump(saved, f)
  ckpt_07 = os.path.join(copy, "checkpoints", "7000")
  mtime = os.path.getmtime(ckpt_07)
  again = _build(copy, model, variables)
  assert again["built"] == [0.4] and again["skipped"] == [0.7]
  assert os.path.getmtime(ckpt_07) == mtime
  # Per-ratio seeds: the resumed library equals the uninterrupted one.
  a = library_lib.load_entry(out, 0.4, variables)
  b = library_lib.load_entry(copy, 0.4, variables)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # Other settings cannot silently extend a library.
  with pytest.raises(ValueError, match="steps"):
    _build(copy, model, variables, steps=3)


# --------------------------------------------------------------------------- stage II


def _hand_quantize(w, bits):
  """EMOMC's symmetric per-tensor quantizer, by hand (numpy float32, like the kernels)."""
  w = np.asarray(w, np.float32)
  if bits >= 32:
    return w
  qmax = np.float32(2.0 ** (bits - 1) - 1)
  step = np.abs(w).max() / qmax
  return np.clip(np.round(w / step), -qmax, qmax) * step


def _fp16_inputs():
  """Reference context: float16-rounded conv/dense inputs, kernels as stored."""
  return QContext(quantize_input=lambda x, i: x.astype(jnp.float16).astype(jnp.float32),
                  quantize_kernel=lambda kernel, i: kernel)


def test_stage2_evaluation_equals_hand_quantized_pruned_checkpoint(problem, default_model):
  _, variables = default_model
  L = problem.workload.num_layers
  rng = np.random.default_rng(0)
  keep = [0.4, 0.7, 1.0, 0.7]
  w_bits = rng.integers(3, 13, size=(4, L))
  w_bits[3] = 32                                  # pruning only: float weights
  result = problem.evaluator(problem.configs(keep, w_bits))

  cfg = problem.cfg
  images, labels = data_lib.load_split(cfg.dataset, cfg.eval_split)
  idx = data_lib.stratified_subset(labels, cfg.eval_per_class, seed=problem.seed)
  x = jnp.asarray(data_lib.preprocess(cfg.dataset, images[idx]))
  y = labels[idx]
  for j, (p, bits) in enumerate(zip(keep, w_bits)):
    v = jax.tree.map(np.array, library_lib.load_entry(problem.source.library_dir, p, variables))
    for i, layer in enumerate(problem.workload.layer_names):
      node = v["params"]
      for part in layer.split("/"):
        node = node[part]
      node["kernel"] = _hand_quantize(node["kernel"], int(bits[i]))
    logits = np.asarray(problem.model.apply(v, x, _fp16_inputs(), train=False), np.float64)
    top1 = np.mean(np.argmax(logits, -1) == y)
    nll = -(logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True))[np.arange(len(y)), y]
    assert result.top1[j] == pytest.approx(top1, abs=1e-7), j
    # FP16 rounding of activations amplifies float32 summation-order differences.
    assert result.loss[j] == pytest.approx(nll.mean(), rel=2e-3), j


def test_search_costs_use_the_configs_keep(problem):
  L = problem.workload.num_layers
  w_bits = np.stack([np.full(L, 4), np.full(L, 8)])
  configs = problem.configs([0.4, 0.7], w_bits)
  _, violation, raw = problem.objectives(configs)
  hand = report_lib.all_costs(problem.workload, [0.4, 0.7], w_bits)
  np.testing.assert_allclose(raw["energy:X|Y"], [h["energy:X|Y"] for h in hand], rtol=1e-5)
  np.testing.assert_allclose(raw["size_kb:csr"], [h["size_kb:csr"] for h in hand], rtol=1e-5)
  n = problem.workload.weights.sum()
  np.testing.assert_allclose(raw["size_kb:csr"], [n * 7 * 0.4 / 8192, n * 11 * 0.7 / 8192],
                             rtol=1e-5)
  assert (violation == 0).all()


def _emomc_energy_reference(layers, p, bits):
  """EMOMC's energy (0.01 mJ) per dataflow, transcribed from the paper's formulas."""
  s = lambda n: 1 - (1 - p) ** n
  out = {}
  for df in ("X|Y", "IC|OC", "Fx|Fy", "X|Fx"):
    total = 0.0
    for (kind, k, ci, co, O), b in zip(layers, bits):
      b = round(b)
      if kind == "dense":
        M = ci * co
        mac, ifm, wr, ofm, psum = M, M, M, co, 0
        e = 0.102 * mac * p * (b + 1) + 0.728 * wr * (b + 1) / 16
        e += 0.728 * ifm * p + 0.447 * ofm
        total += e
        continue
      M = k * k * O * ci * co
      counts = {"X|Y": (M, M, M / O, M / (k * k * ci), 0),
                "IC|OC": (M, M / co, M, M / ci, M / ci),
                "Fx|Fy": (M, M, M / O, M / (k * k), M / (k * k)),
                "X|Fx": (M, M / k, M / math.sqrt(O), M / k, M / k)}[df]
      mac, ifm, wr, ofm, psum = counts
      e = 0.102 * mac * p * (b + 1) + 0.728 * wr * (b + 1) / 16
      if df == "X|Y":
        e += 0.728 * ifm * p + 0.447 * ofm + 0.728 * psum
      elif df == "IC|OC":
        e += 0.728 * ifm * (s(co) if co <= 24 else 1)
        f = s(ci) if ci <= 24 else 1
        e += (0.447 * ofm + 0.728 * psum) * f
      elif df == "Fx|Fy":
        e += 0.728 * ifm * p + (0.447 * ofm + 0.728 * psum) * s(k * k)
      else:
        e += (0.728 * ifm + 0.447 * ofm + 0.728 * psum) * s(k)
      total += e
    out[df] = total / 1e6
  return out


def test_vgg16_energy_and_size_equal_the_formulas():
  # VGG-16 (CIFAR, 32x32x3) by hand: (kind, k, ci, co, output pixels).
  chans = [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8),
           (256, 256, 8), (256, 256, 8), (256, 512, 4), (512, 512, 4), (512, 512, 4),
           (512, 512, 2), (512, 512, 2), (512, 512, 2)]
  layers = [("conv", 3, ci, co, hw * hw) for ci, co, hw in chans] + [("dense", 1, 512, 10, 1)]
  weights = [9 * ci * co for ci, co, _ in chans] + [5120]
  wl = workload_lib.extract_workload("vgg16_cifar", (32, 32, 3), 10)
  assert list(wl.weights) == weights
  rng = np.random.default_rng(1)
  for p, bits in ((0.37, rng.integers(2, 13, 14)), (0.8, np.full(14, 2)), (1.0, np.full(14, 32))):
    got = report_lib.all_costs(wl, [p], bits[None])[0]
    ref = _emomc_energy_reference(layers, p, bits)
    for df, v in ref.items():
      assert got[f"energy:{df}"] == pytest.approx(v, rel=2e-5), (p, df)
    kb = 1024 * 8
    assert got["size_kb:normal"] == pytest.approx(sum(n * b for n, b in zip(weights, bits)) / kb,
                                                  rel=1e-6)
    assert got["size_kb:csr"] == pytest.approx(
        sum(n * (b + 3) * p for n, b in zip(weights, bits)) / kb, rel=1e-6)
    assert got["size_kb:coo"] == pytest.approx(
        sum(n * round(b + math.log2(n)) * p for n, b in zip(weights, bits)) / kb, rel=1e-6)
  # FP32 VGG-16 is ~57.5 MB of weights (EMOMC: ~59 MB with biases and BN).
  assert report_lib.fp32_costs(wl)["size_kb:normal"] == pytest.approx(sum(weights) * 32 / kb)


# --------------------------------------------------------------------------- bad input


def test_bad_input_names_the_value(library, problem):
  lib = library[0]
  with pytest.raises(ValueError, match=r"0\.55.*available.*0\.4"):
    nemo_jax.build_problem(_search_config(lib, keep_choices=[0.4, 0.55]))
  with pytest.raises(ValueError, match="bit-width 1"):
    nemo_jax.build_problem(_search_config(lib, bit_choices=[1, 2, 4]))
  with pytest.raises(ValueError, match=r"size_kb:csr.*cannot be met.*keep 0\.4"):
    nemo_jax.build_problem(_search_config(lib, constraints={"size_kb:csr": 1.0}))
  with pytest.raises(ValueError, match="quantize_activations"):
    nemo_jax.build_problem(_search_config(lib, quantize_activations=True))
  with pytest.raises(ValueError, match="activation_format.*fp16"):
    nemo_jax.build_problem(_search_config(lib, activation_format="int"))
  with pytest.raises(ValueError, match="no library.json"):
    nemo_jax.build_problem(_search_config(os.path.join(lib, "nope")))
  L = problem.workload.num_layers
  with pytest.raises(ValueError, match="bit-width 13"):
    problem.configs([0.4], np.full((1, L), 13))
  with pytest.raises(ValueError, match=r"keep=0\.5 .*allowed.*0\.4"):
    problem.configs([0.5], np.full((1, L), 4))
  with pytest.raises(ValueError, match=r"keep=0\.5"):
    problem.evaluator(problem.configs([0.4], np.full((1, L), 4)).replace(
        keep=jnp.asarray([0.5], jnp.float32)))


def test_nsga2_search_and_unmeetable_accuracy_bound(search_cfg, problem):
  res = run_lib.search(search_cfg, out_dir=None, progress=False, problem=problem)
  assert [r["evaluations"] for r in res.history] == [12, 24]
  assert res.front and all(m["keep"] in (pytest.approx(0.4), pytest.approx(0.7))
                           for m in res.front)
  assert all(m["metrics"]["size_kb:csr"] <= 500.0 for m in res.front)
  # An accuracy bound nothing meets: said after generation 0 with the closest config.
  cfg = load_search_config(search_cfg, constraints={"top1_error": -0.5}, generations=0)
  bad = dataclasses.replace(problem, cfg=cfg.problem)
  with pytest.warns(UserWarning, match=r"top1_error <= -0\.5.*closest configuration: keep="):
    run_lib.search(cfg, out_dir=None, progress=False, problem=bad)
  cfg = load_search_config(cfg, infeasible="error")
  with pytest.raises(ValueError, match="closest configuration"):
    run_lib.search(cfg, out_dir=None, progress=False,
                   problem=dataclasses.replace(problem, cfg=cfg.problem))


def test_nemo_species_choose_the_keep_ratio(search_cfg, problem):
  species = ["direct_round", "direct_floor", {"kind": "gcn", "hidden": 8},
             {"kind": "graph_unet", "hidden": 8}]
  cfg = load_search_config(search_cfg, species=species, selection="nsga3", resize=True)
  res = run_lib.search(cfg, out_dir=None, progress=False,
                       problem=dataclasses.replace(problem, cfg=cfg.problem))
  assert [r["evaluations"] for r in res.history] == [12, 24]
  archive = res.archive
  kept = {round(float(problem.keep_choices[i]), 4) for i in archive["keep_idx"][archive["valid"]]}
  assert kept <= set(RATIOS)
  assert res.front and {m["species"] for m in res.front} <= {
      "direct_round", "direct_floor", "gcn", "graph_unet"}


# --------------------------------------------------------------------------- report


def test_table_chooses_cheapest_member_within_the_loss():
  ref = {n: 100.0 for n in report_lib.ENERGY_NAMES + report_lib.SIZE_NAMES}
  cands = [{"keep": 0.5, "w_bits": [4], "top1": 0.90, "costs": {**ref, "energy:X|Y": 10.0}},
           {"keep": 0.3, "w_bits": [3], "top1": 0.896, "costs": {**ref, "energy:X|Y": 5.0}},
           {"keep": 0.2, "w_bits": [2], "top1": 0.80, "costs": {**ref, "energy:X|Y": 1.0}}]
  best = report_lib.choose(cands, 0.90, 0.005, "energy:X|Y")
  assert best["keep"] == 0.3                          # 0.4% loss: admissible, cheapest
  assert report_lib.choose(cands, 0.95, 0.005, "energy:X|Y") is None
  row = report_lib.table_row("x", best["costs"], ref, best["top1"], 0.90, best["keep"], [3])
  assert row["energy_x"]["X|Y"] == pytest.approx(20.0)
  assert row["size_x"]["csr"] == pytest.approx(1.0)
  table = report_lib.build_table([row, None], 0.90, 0.005, "energy:X|Y", ["x", "y"])
  text = report_lib.format_table(table)
  assert "20.00x" in text and "no candidate" in text


def test_choose_selects_on_the_selection_set_not_the_test_set():
  ref = {n: 100.0 for n in report_lib.ENERGY_NAMES + report_lib.SIZE_NAMES}
  # Test and selection disagree: the cheap member is admissible on the selection set
  # only, the dear one on the test set only.
  cands = [{"keep": 0.2, "top1": 0.80, "selection_top1": 0.899,
            "costs": {**ref, "energy:X|Y": 1.0}},
           {"keep": 0.5, "top1": 0.90, "selection_top1": 0.70,
            "costs": {**ref, "energy:X|Y": 10.0}}]
  assert report_lib.choose(cands, 0.90, 0.005, "energy:X|Y",
                           key="selection_top1")["keep"] == 0.2
  assert report_lib.choose(cands, 0.90, 0.005, "energy:X|Y", key="top1")["keep"] == 0.5


def test_report_picks_members_by_selection_accuracy_and_reports_test(library, problem,
                                                                      tmp_path):
  # A hand-built front whose recorded accuracies make test and selection disagree:
  # member 0 is perfect on the selection set and useless on the test set, member 1 the
  # reverse. Choosing on the selection set must take member 0 and report its test top-1.
  cfg = _search_config(library[0], final_split="test", final_max_images=20)
  L = problem.workload.num_layers
  # (the other fields of a front.json entry, not read by the report)
  rest = {"a_bits": [16] * problem.workload.num_act_quantizers, "species": "direct_round",
          "generation": 0, "objectives": {}, "metrics": {}}
  front = [{"keep": 0.4, "w_bits": [4] * L, "selection_top1": 1.0, "final_top1": 0.0, **rest},
           {"keep": 0.7, "w_bits": [8] * L, "selection_top1": 0.0, "final_top1": 1.0, **rest}]
  (tmp_path / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
  (tmp_path / "front.json").write_text(json.dumps(front))
  table = report_lib.emomc_report(str(tmp_path), max_loss=0.005, problem=problem)
  row = table["rows"][0]
  assert table["selected_on"] == "selection"
  assert row["keep"] == pytest.approx(0.4) and row["w_bits"] == [4] * L
  assert row["selection_top1"] == 1.0 and row["top1"] == 0.0
  assert row["accuracy_loss"] == pytest.approx(table["fp32_top1"])
  assert row["selection_loss"] == pytest.approx(table["fp32_selection_top1"] - 1.0)
  # The FP32 references are the evaluator's on the two sets (test: final_split subset).
  x_sel, y_sel = selection_data(cfg.problem, cfg.seed, cfg.selection_per_class)
  assert table["fp32_selection_top1"] == pytest.approx(
      float(problem.make_evaluator(x_sel, y_sel).evaluate_float().top1))
  assert "sel" in report_lib.format_table(table)


# --------------------------------------------------------------------------- CLI


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "nemo_jax.cli", *args], capture_output=True,
                        text=True, cwd=REPO, timeout=900)


def test_cli_end_to_end(tmp_path):
  lib = str(tmp_path / "lib")
  r = _cli("prune-library", "resnet20", "--keep-range", "0.5:0.6:0.1", "--steps", "1",
           "--steps-per-stage", "1", "--batch-size", "16", "--train-max-images", "160",
           "--eval-max-images", "20", "--out", lib, "--quiet")
  assert r.returncode == 0, r.stderr
  assert "0.5000" in r.stdout and "0.6000" in r.stdout and "built 2" in r.stdout

  cfg = load_search_config(_search_config(lib, keep_choices=[0.5, 0.6], final_split="test",
                                          final_max_images=20)).to_dict()
  path = tmp_path / "cfg.json"
  path.write_text(json.dumps(cfg))
  run = tmp_path / "run"
  r = _cli("search", "--config", str(path), "--out", str(run), "--quiet")
  assert r.returncode == 0, r.stderr
  front = json.loads((run / "front.json").read_text())
  assert front and all(m["keep"] in (pytest.approx(0.5), pytest.approx(0.6)) for m in front)
  assert all("final_top1" in m and m["metrics"]["size_kb:csr"] <= 500.0 for m in front)
  r = _cli("emomc-report", str(run), "--max-loss", "1.0")
  assert r.returncode == 0, r.stderr
  table = json.loads((run / report_lib.TABLE_JSON).read_text())
  assert [row["method"] for row in table["rows"]] == [
      "EMOMC (pruning + quantization)", "pruning only (FP32 weights)",
      "quantization only (uniform)"]
  emomc = table["rows"][0]
  assert emomc["keep"] in (pytest.approx(0.5), pytest.approx(0.6))
  assert emomc["size_x"]["csr"] > 1 and emomc["energy_x"]["X|Y"] > 1
  assert "X|Y" in r.stdout and (run / report_lib.TABLE_CSV).exists()

  # Bad input: one line naming the value, exit status 2, no traceback.
  cfg["problem"]["keep_choices"] = [0.5, 0.55]
  path.write_text(json.dumps(cfg))
  r = _cli("search", "--config", str(path), "--out", str(tmp_path / "bad"))
  assert r.returncode == 2 and "0.55" in r.stderr and "Traceback" not in r.stderr
