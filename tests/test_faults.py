"""Faults during long runs: stop signals, unwritable / full disks, damaged checkpoints."""

from __future__ import annotations

import errno
import os
import signal

import numpy as np
import pytest

from nemo_jax._src import faults


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
    step, restored, problems = faults.restore_latest_good([3, 4, 5], restore, "runs/x")
  assert (step, restored) == (4, {"step": 4}) and len(problems) == 1
  with pytest.raises(ValueError, match=r"runs/x.*step 5.*step 4.*intact"):
    faults.restore_latest_good([4, 5], lambda s: (_ for _ in ()).throw(OSError("gone")),
                               "runs/x")
  with pytest.raises(ValueError, match="no checkpoint step"):
    faults.restore_latest_good([], restore, "runs/x")


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
