"""Fine-tuning: a W2A2 member's loss drops, accuracies are the evaluator's (before: the
run's own record; after: the evaluator on the saved variables), resume, stop, CLI."""

from __future__ import annotations

import json
import os
import signal

import jax
import numpy as np
import pytest

import nemo_jax
from nemo_jax import cli
from nemo_jax._src import checkpoint as ckpt
from nemo_jax._src import data as data_lib
from nemo_jax._src import faults
from nemo_jax._src import finetune as ft
from nemo_jax._src.evaluator import Evaluator
from nemo_jax._src.problem import fitness_data, image_sets, selection_data

# Tiny: 320 training images, 10 steps of 32 at the default learning rate (1e-3 with Adam
# overshoots W2A2 with affine weights: the eval-mode loss rises while the train-mode one
# falls, BatchNorm's running statistics lagging).
SETTINGS = {"max_images": 320, "batch_size": 32, "learning_rate": 1e-4}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, make_run_dir):
  out, problem, front = make_run_dir(str(tmp_path_factory.mktemp("ft")),
                                     objectives=("top1_error", "model_ratio", "bops_ratio"),
                                     final_split="test", lowest=True)
  k = len(front) - 1
  assert set(front[k]["w_bits"]) == {2} and set(front[k]["a_bits"]) == {2}
  (entry,) = nemo_jax.finetune_members(out, [k], epochs=1, config=SETTINGS, progress=False)
  return out, problem, front, k, entry


def _config(problem, entry):
  configs = problem.configs([entry["keep"]], [entry["w_bits"]], [entry["a_bits"]])
  return jax.tree.map(lambda x: x[0], configs)


def test_one_epoch_lowers_the_w2a2_training_loss(tuned):
  _, _, _, _, entry = tuned
  before, after = entry["train"]["before"], entry["train"]["after"]
  assert entry["train"]["images"] == 320 and len(entry["epoch_loss"]) == 1
  assert np.isfinite(after["loss"]) and after["loss"] < before["loss"] - 0.05, entry["train"]


def test_accuracies_are_the_evaluators_before_and_after(tuned):
  out, problem, front, k, entry = tuned
  # Before: the fitness top-1 the run itself recorded for this member.
  assert entry["fitness"]["before"]["top1"] == pytest.approx(
      1.0 - front[k]["objectives"]["top1_error"], abs=1e-6)
  # After: the project's evaluator (PTQ, the run's calibration) on the saved variables.
  source = problem.source
  variables = ckpt.load_variables(entry["variables"], source.model, source.input_shape)
  run_cfg = nemo_jax.RunDir(out).read_config()
  x_fit, y_fit, _ = fitness_data(problem.cfg, problem.seed, run_cfg.run.selection_per_class,
                                 held_out=problem.held_out)
  evaluator = Evaluator(source.model, variables, problem.scheme, x_fit, y_fit)
  top1 = float(np.asarray(evaluator.run(jax.tree.map(lambda x: x[None],
                                                     _config(problem, entry))).top1)[0])
  assert entry["fitness"]["after"]["top1"] == pytest.approx(top1, abs=1e-6)
  # Before, on the selection set: the PTQ member through the run's own evaluator.
  selection = problem.make_evaluator(*selection_data(problem.cfg, problem.seed,
                                                     run_cfg.run.selection_per_class,
                                                     held_out=problem.held_out))
  top1 = float(np.asarray(selection.run(jax.tree.map(lambda x: x[None],
                                                     _config(problem, entry))).top1)[0])
  assert entry["selection"]["before"]["top1"] == pytest.approx(top1, abs=1e-6)


def test_finetuned_json_and_plot(tuned):
  out, _, front, k, entry = tuned
  with open(os.path.join(out, ft.FINETUNED_FILE)) as f:
    saved = json.load(f)
  assert [e["member"] for e in saved] == [k] and saved[0] == json.loads(json.dumps(entry))
  assert entry["objectives"] == front[k]["objectives"]           # the bits did not change
  tuned_obj = entry["objectives_finetuned"]
  assert tuned_obj["model_ratio"] == front[k]["objectives"]["model_ratio"]
  assert tuned_obj["top1_error"] == pytest.approx(1 - entry["fitness"]["after"]["top1"])
  assert entry["final"]["images"] == 40 and set(entry["final"]) == {"images", "before", "after"}
  assert entry["selection"]["images"] == 40   # smoke: 4 per class, held out of training
  assert set(entry["selection"]) == {"images", "before", "after"}
  for split in ("train", "fitness", "selection", "final"):
    for when in ("before", "after"):
      assert 0.0 <= entry[split][when]["top1"] <= entry[split][when]["top5"] <= 1.0
  assert os.path.getsize(os.path.join(out, ft.FINETUNED_PLOT)) > 0
  # Pruned weights stay zero: the saved kernels are masked like the PTQ member.
  assert os.path.exists(entry["variables"])


def test_resume_skips_a_finished_member_and_continues_to_more_epochs(tuned, capsys):
  out, _, _, k, entry = tuned
  directory = os.path.join(out, ft.FINETUNE_DIR, str(k))
  steps = sorted(os.listdir(directory))
  assert cli.main(["finetune", out, "--members", str(k), "--quiet"]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed[0]["member"] == k and printed[0]["epochs"] == 1
  assert sorted(os.listdir(directory)) == steps               # nothing retrained
  (more,) = nemo_jax.finetune_members(out, [k], epochs=2, config=SETTINGS, progress=False)
  assert len(more["epoch_loss"]) == 2 and more["epoch_loss"][0] == entry["epoch_loss"][0]
  assert more["train"]["before"] == entry["train"]["before"]


def test_stop_request_raises_at_a_step_boundary(tuned):
  out, problem, front, _, _ = tuned
  stop = faults.GracefulStop("again")
  stop.signum = signal.SIGTERM
  loaded = (problem, _config(problem, front[0]), front[0])
  with pytest.raises(faults.StopRequested) as e:
    ft.finetune_member(out, 0, ft.FinetuneConfig.from_dict(SETTINGS), stop, False, loaded)
  assert e.value.exit_status == 143
  with open(os.path.join(out, ft.FINETUNED_FILE)) as f:
    assert 0 not in [m["member"] for m in json.load(f)]


@pytest.mark.parametrize("argv,words", [
    (["--members", "99"], ["member=99", "0..3"]),
    (["--members", "1,x"], ["--members", "integers"]),
    (["--members", "1,1"], ["twice"]),
    (["--members", "0", "--epochs", "0"], ["epochs", ">= 1"]),
    (["--members", "0", "--optimizer", "lion"], ["optimizer", "adam"]),
])
def test_cli_bad_input_exits_2(tuned, capsys, argv, words):
  out = tuned[0]
  assert cli.main(["finetune", out, *argv]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err
  for w in words:
    assert w in err


def test_cli_missing_run_dir_exits_2(tmp_path, capsys):
  assert cli.main(["finetune", str(tmp_path / "nope"), "--members", "0"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "run_dir" in err


def test_training_images_leave_the_selection_images_out(tuned):
  out, problem, _, _, _ = tuned
  cfg = nemo_jax.RunDir(out).read_config()
  _, labels = data_lib.load_split(cfg.dataset, cfg.eval_split)
  selection = image_sets(cfg.problem, labels, problem.seed,
                         cfg.run.selection_per_class)["selection"]
  for max_images in (None, 320):
    settings = ft.FinetuneConfig.from_dict({"max_images": max_images})
    idx = ft.train_indices(cfg, settings, labels)
    assert np.intersect1d(idx, selection).size == 0
    assert len(idx) == (len(labels) - len(selection) if max_images is None else 320)
  # The shipped checkpoint's held-out images (its metadata) all stay out of training.
  assert problem.held_out is not None
  held = data_lib.held_out_split(labels, *problem.held_out)[1]
  idx = ft.train_indices(cfg, ft.FinetuneConfig(), labels, problem.held_out)
  assert np.intersect1d(idx, held).size == 0 and len(idx) == len(labels) - len(held)
  # Another split than eval_split: all of it; the run's test split: refused.
  other = cfg.replace(eval_split="test", final_split=None)
  assert len(ft.train_indices(other, ft.FinetuneConfig(), labels)) == len(labels)
  with pytest.raises(ValueError, match="train_split='test' is the run's final_split"):
    ft.train_indices(cfg, ft.FinetuneConfig.from_dict({"train_split": "test"}), labels)


def test_config_rejects_bad_fields():
  with pytest.raises(ValueError, match="optimizer"):
    ft.FinetuneConfig.from_dict({"optimizer": "lion"})
  with pytest.raises(ValueError, match="learning_rate"):
    ft.FinetuneConfig.from_dict({"learning_rate": 0.0})
