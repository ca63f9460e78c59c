"""Sharded and multi-host population evaluation equal the single-device result exactly.

Fake CPU devices need XLA_FLAGS before JAX is imported, so the sharded runs happen in
subprocesses (tests/_multihost_worker.py); this process keeps its single default device
and computes the reference.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from nemo_jax import evaluation
from nemo_jax._src import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_multihost_worker.py")
TIMEOUT_S = 240

_spec = importlib.util.spec_from_file_location("_multihost_worker", WORKER)
worker = sys.modules.get("_multihost_worker")
if worker is None:  # registered: flax dataclasses look their module up
  worker = sys.modules["_multihost_worker"] = importlib.util.module_from_spec(_spec)
  _spec.loader.exec_module(worker)


def _env(devices_per_process: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
  """Single-process, single-device result."""
  model, variables, calibration, images, labels, configs = worker.build_problem()
  mesh = distributed.population_mesh(jax.devices()[:1])
  spec = evaluation.QuantSpec(weight_quant="symmetric_per_channel")  # as the worker's
  ev = evaluation.Evaluator(model, variables, evaluation.ptq_scheme(calibration, spec), images,
                            labels, batch_size=worker.BATCH_SIZE, strategy="map", mesh=mesh)
  assert ev.num_devices == 1
  return ev(configs)


def _assert_same(result_file, reference, devices, local_devices, processes):
  got = np.load(result_file)
  assert int(got["num_devices"]) == devices and int(got["mesh_size"]) == devices
  assert int(got["num_local_devices"]) == local_devices
  assert int(got["num_processes"]) == processes
  for field in ("top1", "top5", "loss"):
    np.testing.assert_array_equal(got[field], getattr(reference, field), err_msg=field)


def test_four_local_devices_equal_single_device(tmp_path, reference):
  out = tmp_path / "sharded.npz"
  proc = subprocess.run([sys.executable, WORKER, "--out", str(out)], env=_env(4),
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _assert_same(out, reference, devices=4, local_devices=4, processes=1)


def test_two_processes_equal_single_process(tmp_path, reference):
  port = _free_port()
  procs, outs = [], []
  for pid in range(2):
    out = tmp_path / f"process{pid}.npz"
    outs.append(out)
    procs.append(subprocess.Popen(
        [sys.executable, WORKER, "--out", str(out), "--num-processes", "2",
         "--process-id", str(pid), "--port", str(port)],
        env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  logs = []
  try:
    for proc in procs:
      _, err = proc.communicate(timeout=TIMEOUT_S)
      logs.append(err)
  finally:
    for proc in procs:  # never leave a process waiting for its peer
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  for proc, err in zip(procs, logs):
    assert proc.returncode == 0, err[-3000:]
  for out in outs:  # every host gets the full population's results
    _assert_same(out, reference, devices=4, local_devices=2, processes=2)


def test_put_global_and_to_host_single_process():
  mesh = distributed.population_mesh()
  x = np.arange(12, dtype=np.float32).reshape(12, 1)
  arr = distributed.put_global(x, distributed.population_sharding(mesh))
  np.testing.assert_array_equal(distributed.to_host(arr), x)
  with pytest.raises(ValueError, match="devices"):
    distributed.population_mesh([])
  with pytest.raises(ValueError, match="process_id"):
    distributed.initialize("127.0.0.1:1", num_processes=2, process_id=5)
