"""Faults during long runs: stop signals, unwritable / full disks, damaged checkpoints."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nemo_jax._src import faults
from nemo_jax._src.run import checkpoint as ckpt_lib
from nemo_jax._src.run import search as run_lib
from nemo_jax._src.run.rundir import CHECKPOINT_DIR, DAMAGED_DIR


def test_graceful_stop_defers_the_signal_to_the_step_boundary():
  with faults.GracefulStop("resume with: nemo-jax search --resume runs/x") as stop:
    stop.check()                       # nothing pending: no-op
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested              # recorded, the process is still running
    with pytest.raises(faults.StopRequested, match="SIGTERM.*--resume runs/x") as info:
      stop.check()
  assert info.value.exit_status == 143
  # The previous handler is back after the block.
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_second_signal_stops_at_once():
  with faults.GracefulStop() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert faults.StopRequested(signal.SIGINT).exit_status == 130


def test_probe_rejects_unwritable_and_full_directories(tmp_path, monkeypatch):
  faults.probe_writable(str(tmp_path / "new" / "dir"))   # created and writable
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match=r"out_dir=.*a_file/run.*not writable"):
    faults.probe_writable(str(blocker / "run"))
  with pytest.raises(ValueError, match=r"MiB free.*needs about"):
    faults.probe_writable(str(tmp_path), needed_bytes=2**62)
  # An injected "No space left on device" on the probe write.
  real_fdopen = os.fdopen

  class Full:
    def __init__(self, f):
      self.f = f

    def __enter__(self):
      return self

    def __exit__(self, *a):
      self.f.close()

    def write(self, data):
      raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
  with pytest.raises(ValueError, match="No space left on device"):
    faults.probe_writable(str(tmp_path / "full"))
  assert not [f for f in os.listdir(tmp_path / "full") if f.startswith(".nemo_jax_probe")]


def test_restore_falls_back_to_the_newest_good_step():
  def restore(step):
    if step == 5:
      raise KeyError("state")
    return {"step": step}

  with pytest.warns(UserWarning, match=r"step 5: KeyError.*resumed from step 4"):
    step, restored, problems = ckpt_lib.restore_newest_good([3, 4, 5], restore, "runs/x")
  assert (step, restored) == (4, {"step": 4}) and len(problems) == 1
  with pytest.raises(ValueError, match=r"runs/x.*step 5.*step 4.*intact"):
    ckpt_lib.restore_newest_good([4, 5], lambda s: (_ for _ in ()).throw(OSError("gone")),
                                 "runs/x")
  with pytest.raises(ValueError, match="no checkpoint step"):
    ckpt_lib.restore_newest_good([], restore, "runs/x")


def test_nonfinite_variables_name_the_layer(tmp_path):
  from nemo_jax import models
  model, variables = models.load_default_model()
  bad = {"params": {k: dict(v) for k, v in variables["params"].items()},
         "batch_stats": variables["batch_stats"]}
  kernel = np.array(bad["params"]["layer2_1"]["conv1"]["kernel"])
  kernel[0, 0, 0, 0] = np.inf
  bad["params"]["layer2_1"]["conv1"] = {**bad["params"]["layer2_1"]["conv1"], "kernel": kernel}
  path = tmp_path / "bad.msgpack"
  models.save_variables(path, bad)
  with pytest.raises(ValueError, match=r"layer 'params/layer2_1/conv1/kernel' holds 1 NaN/inf"):
    models.load_variables(path, model, (28, 28, 1))


# --------------------------------------------------------------------------- search runs
# One 3-generation smoke run is the reference; each test copies it or reruns part of it.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "configs", "smoke.py")
G = 3


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "nemo_jax.cli", *args], capture_output=True,
                        text=True, cwd=REPO, timeout=900)


def _start_cli(*args):
  return subprocess.Popen([sys.executable, "-m", "nemo_jax.cli", *args], cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _steps(run):
  ckpt = os.path.join(run, CHECKPOINT_DIR)
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def _front(run):
  with open(os.path.join(run, "front.json")) as f:
    return json.load(f)



@pytest.fixture(scope="module")
def reference(tmp_path_factory, smoke_problem):
  out = str(tmp_path_factory.mktemp("reference") / "run")
  run_lib.search(SMOKE, out_dir=out, progress=False, problem=smoke_problem, generations=G)
  return out


def _copy(reference, tmp_path):
  run = str(tmp_path / "run")
  shutil.copytree(reference, run)
  os.remove(os.path.join(run, "front.json"))
  return run


def test_resume_falls_back_past_a_damaged_newest_step(reference, smoke_problem, tmp_path):
  run = _copy(reference, tmp_path)
  assert _steps(run) == [G - 1, G]                        # max_to_keep = 2
  shutil.rmtree(os.path.join(run, CHECKPOINT_DIR, str(G), "state"))
  with pytest.warns(UserWarning, match=rf"step {G}: .*resumed from step {G - 1}"):
    run_lib.search(out_dir=run, resume=True, progress=False, problem=smoke_problem)
  assert _front(run) == _front(reference)                 # the lost generation is redone
  damaged = os.listdir(os.path.join(run, DAMAGED_DIR))
  assert len(damaged) == 1 and damaged[0].startswith(f"{G}.")   # kept for inspection
  assert _steps(run) == [G - 1, G]


def test_resume_with_no_intact_step_is_one_clear_error(reference, tmp_path):
  run = _copy(reference, tmp_path)
  for step in _steps(run):
    shutil.rmtree(os.path.join(run, CHECKPOINT_DIR, str(step), "state"))
  r = _cli("search", "--resume", run, "--quiet")
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1
  assert re.search(rf"no checkpoint in .*checkpoints.*restores completely.*step {G}:.*"
                   rf"step {G - 1}:", lines[0]), lines[0]


def test_resume_refuses_an_incompatible_config_naming_the_field(reference):
  with pytest.raises(ValueError, match=r"population=16 differs .* population=8"):
    run_lib.search(out_dir=reference, resume=True, progress=False, population=16)
  smoke = runpy.run_path(SMOKE)["get_config"]()
  with pytest.raises(ValueError, match=r"model='resnet18' differs .* model='resnet20'"):
    run_lib.search({**smoke, "model": "resnet18"}, out_dir=reference,
                   resume=True, progress=False)
  r = _cli("search", "--resume", reference, "--seed", "3", "--quiet")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert "error: resume: seed=3 differs" in r.stderr and "allowed overrides" in r.stderr


def test_a_new_run_never_overwrites_a_previous_one(reference, smoke_problem, tmp_path):
  run = str(tmp_path / "run")
  shutil.copytree(reference, run)
  with pytest.raises(ValueError, match=r"already holds a run .*resume.*overwrite"):
    run_lib.search(SMOKE, out_dir=run, progress=False, problem=smoke_problem)
  assert _front(run) == _front(reference)                 # untouched
  res = run_lib.search(SMOKE, out_dir=run, progress=False, problem=smoke_problem,
                       generations=1, overwrite=True)
  assert _steps(run) == [0, 1] and len(res.history) == 2


def test_a_failed_checkpoint_write_keeps_the_previous_step(smoke_problem, reference, tmp_path,
                                                           monkeypatch):
  run = str(tmp_path / "run")
  real_save = ocp.CheckpointManager.save

  def disk_full_at_step_2(self, step, *args, **kwargs):
    if step == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_at_step_2)
  with pytest.raises(faults.CheckpointWriteError,
                     match=r"step 2 .*No space left on device.*step 1\) is intact"):
    run_lib.search(SMOKE, out_dir=run, progress=False, problem=smoke_problem, generations=G)
  monkeypatch.undo()
  assert _steps(run) == [0, 1]
  run_lib.search(out_dir=run, resume=True, progress=False, problem=smoke_problem)
  assert _front(run) == _front(reference)


@pytest.fixture
def tiny_tmpfs(tmp_path):
  """An 8 MiB tmpfs (needs root and mount rights; the injected failure above covers the rest)."""
  mnt = tmp_path / "tiny"
  mnt.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                                          str(mnt)], capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here")
  yield str(mnt)
  subprocess.run(["umount", str(mnt)], check=True)


def test_a_really_full_disk_mid_run_keeps_the_previous_step(tiny_tmpfs, smoke_problem,
                                                            reference):
  run = os.path.join(tiny_tmpfs, "run")

  def fill_the_disk(row):  # another process fills the disk after generation 1
    if row["generation"] == 1:
      with open(os.path.join(tiny_tmpfs, "filler"), "wb", buffering=0) as f:
        with pytest.raises(OSError, match="No space left"):
          while True:
            f.write(b"\0" * 65536)

  with pytest.raises(faults.CheckpointWriteError,
                     match=r"step 2 .*No space left on device.*step 1\) is intact"):
    run_lib.search(SMOKE, out_dir=run, progress=False, problem=smoke_problem, generations=G,
                   callback=fill_the_disk)
  assert _steps(run) == [0, 1]
  with pytest.raises(ValueError, match=r"out_dir=.*not writable.*No space left"):
    run_lib.search(out_dir=run, resume=True, progress=False, problem=smoke_problem)
  os.remove(os.path.join(tiny_tmpfs, "filler"))           # the user frees space
  run_lib.search(out_dir=run, resume=True, progress=False, problem=smoke_problem)
  assert _front(run) == _front(reference)


def test_sigint_stops_at_the_generation_boundary_with_results_readable(smoke_problem,
                                                                       reference, tmp_path):
  run = str(tmp_path / "run")

  def interrupt(row):  # the user presses Ctrl-C during generation 1's bookkeeping
    if row["generation"] == 1:
      os.kill(os.getpid(), signal.SIGINT)

  with pytest.raises(faults.StopRequested, match=r"SIGINT.*--resume") as info:
    run_lib.search(SMOKE, out_dir=run, progress=False, problem=smoke_problem, generations=G,
                   callback=interrupt)
  assert info.value.exit_status == 130
  assert _steps(run) == [0, 1]
  assert _front(run)                                      # the front so far, readable
  with open(os.path.join(run, "history.csv")) as f:
    assert len(f.read().splitlines()) == 1 + 2            # header + generations 0, 1
  run_lib.search(out_dir=run, resume=True, progress=False, problem=smoke_problem)
  assert _front(run) == _front(reference)


def test_sigterm_to_the_cli_exits_143_with_a_resume_line(smoke_problem, reference, tmp_path):
  run = str(tmp_path / "run")
  # Many generations so the signal surely lands inside the loop; the resumed run is cut
  # back to G generations (the engine does not depend on the total).
  proc = _start_cli("search", "--config", SMOKE, "--out", run, "--generations", "50",
                    "--quiet")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None and not _steps(run):
    time.sleep(0.05)
  assert proc.poll() is None, proc.stderr.read()
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 143, stderr
  assert "Traceback" not in stderr
  assert f"stopped by SIGTERM; resume with: nemo-jax search --resume {run}" in stderr
  last = _steps(run)[-1]
  assert 1 <= last < G, "the signal came too late for this test"
  assert _front(run)
  with open(os.path.join(run, "history.csv")) as f:
    assert len(f.read().splitlines()) == 1 + last + 1
  run_lib.search(out_dir=run, resume=True, progress=False, problem=smoke_problem,
                 generations=G)
  assert _front(run) == _front(reference)


# --------------------------------------------------------------------------- prune-library

LIBRARY = dict(steps=1, steps_per_stage=1, batch_size=16, train_max_images=80,
               eval_max_images=20, model="resnet20", checkpoint="default",
               dataset="fashion_mnist_embedded", keep_ratios=(0.5, 0.7), schedule="chain")


def test_prune_library_stop_and_damaged_entry(tmp_path, monkeypatch):
  from nemo_jax import emomc
  from nemo_jax._src import train as train_lib
  from nemo_jax._src.checkpoint import load_default_model
  model, variables = load_default_model()
  out = str(tmp_path / "library")
  cfg = {**LIBRARY, "out_dir": out}
  real_accuracy = train_lib.float_accuracy

  calls = []

  def interrupt_after_first(*args, **kwargs):  # SIGTERM while 0.7 is being recorded
    calls.append(1)
    if len(calls) == 2:                                   # 1: the dense entry, 2: keep 0.7
      os.kill(os.getpid(), signal.SIGTERM)
    return real_accuracy(*args, **kwargs)

  monkeypatch.setattr(train_lib, "float_accuracy", interrupt_after_first)
  with pytest.raises(faults.StopRequested, match="SIGTERM.*run the same command again") as info:
    emomc.build_library(cfg, model, variables, progress=False)
  monkeypatch.undo()
  assert info.value.exit_status == 143
  saved = emomc.read_library(out)["entries"]
  # The finished ratio is kept, 0.5 (not started) is not there.
  assert sorted(saved) == sorted([emomc.ratio_key(1.0), emomc.ratio_key(0.7)])
  meta = emomc.build_library(cfg, model, variables, progress=False)
  assert meta["built"] == [0.5] and meta["skipped"] == [0.7]
  # A damaged finished entry (its array data gone) is rebuilt, with a warning.
  entry = os.path.join(out, emomc.read_library(out)["entries"][emomc.ratio_key(0.5)]["checkpoint"])
  for name in os.listdir(entry):
    if name != "_CHECKPOINT_METADATA":
      shutil.rmtree(os.path.join(entry, name), ignore_errors=True)
      if os.path.exists(os.path.join(entry, name)):
        os.remove(os.path.join(entry, name))
  with pytest.warns(UserWarning, match=r"keep ratio 0.5 cannot be restored.*rebuilding it"):
    meta = emomc.build_library(cfg, model, variables, progress=False)
  assert meta["built"] == [0.5]
  restored = emomc.load_entry(out, 0.5, variables)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))


# --------------------------------------------------------------------------- soak (-m slow)

@pytest.mark.slow
def test_soak_random_kill_9_points_then_resume_give_the_same_front(tmp_path):
  """20 ``kill -9`` at random moments of a 6-generation smoke run, each resumed."""
  generations, kills = 6, 20
  ref = str(tmp_path / "ref")
  assert _cli("search", "--config", SMOKE, "--out", ref, "--generations",
              str(generations), "--quiet").returncode == 0
  run = str(tmp_path / "run")
  rng = random.Random(0)
  done = killed = 0
  args = ["search", "--config", SMOKE, "--out", run, "--generations", str(generations),
          "--quiet"]
  while killed < kills:
    proc = _start_cli(*args)
    # Random moments from start-up (before any checkpoint) to the final phase.
    time.sleep(rng.uniform(2.0, 25.0))
    if proc.poll() is None:
      proc.kill()
      killed += 1
    proc.communicate(timeout=300)
    if proc.returncode == 0:                  # finished before the kill: start over
      assert _front(run) == _front(ref)
      done += 1
      shutil.rmtree(run)
    elif os.path.exists(os.path.join(run, "config.json")):
      args = ["search", "--resume", run, "--quiet"]
      continue
    args = ["search", "--config", SMOKE, "--out", run, "--generations", str(generations),
            "--quiet"]
  r = _cli(*args)
  assert r.returncode == 0, r.stderr
  assert _front(run) == _front(ref)


def test_write_atomic_keeps_the_previous_file_when_a_write_fails(tmp_path):
  path = str(tmp_path / "front.json")
  faults.write_json(path, {"a": 1})

  def broken(f):
    f.write("{\"half")
    raise OSError("No space left on device")

  with pytest.raises(OSError, match="No space"):
    faults.write_atomic(path, broken, mode="w")
  assert json.load(open(path)) == {"a": 1}
  assert os.listdir(tmp_path) == ["front.json"]  # no temporary file left behind
