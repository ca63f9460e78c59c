"""Bad input and faults through the command line, as a hostile but realistic user tries them.

Every kind in ``CASES`` runs ``python -m nemo_jax.cli`` as a subprocess and must end
cleanly: the expected exit status (2 for a user's mistake), exactly one ``error:`` line
naming the field, flag or file, no traceback, and nothing lost (every file that existed
before has the same sha256 after; nothing the command was refused to create exists).
Plus the faults that need real processes: two searches into one directory at once, a
second Ctrl-C, a disk that fills mid-run; and the same rules through the API.

The case list doubles as a harness: ``python tests/test_bad_input.py`` runs every kind
against the package on ``NEMO_JAX_TREE`` (default: this repository) and prints which are
clean (the before / after counts of issue 29).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREE = os.environ.get("NEMO_JAX_TREE", REPO)
SMOKE = os.path.join(TREE, "experiments", "configs", "smoke.py")
DEFAULT_CKPT = os.path.join(REPO, "nemo_jax", "assets", "resnet20_fashion_mnist.msgpack")
WORKERS = 3


# --------------------------------------------------------------------------- helpers

def _write(path: str, text: str | bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(text, bytes) else "w") as f:
    f.write(text)


def _smoke(**changes) -> dict:
  """The smoke config (a seconds-long run) with flat fields changed (a flat key next to
  the sections overrides the section's field)."""
  import runpy
  cfg = runpy.run_path(SMOKE)["get_config"]()
  cfg.update(changes)
  return cfg


def _json(path: str, obj) -> None:
  _write(path, json.dumps(obj))


FACTORY = """
import flax.linen as nn
import jax
import jax.numpy as jnp


class Flat(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def make():
  model = Flat()
  return model, model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def broken():
  raise RuntimeError("the weights server is down")
"""

FAKE_TORCH = """
import numpy as np


def load(path, map_location=None, weights_only=True):
  return dict(np.load(path))
"""


def _fake_torch(d: str) -> None:
  """A stand-in ``torch`` module (reads .pth files written with numpy) on PYTHONPATH."""
  _write(os.path.join(d, "fake", "torch", "__init__.py"), FAKE_TORCH)


def _npz_pth(path: str, arrays: dict) -> None:
  import numpy as np
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def _nan_pth(d):
  import numpy as np
  _fake_torch(d)
  w = np.ones((64, 3, 7, 7), np.float32)
  w[3, 1, 2, 2] = np.nan
  _npz_pth(os.path.join(d, "r18.pth"), {"conv1.weight": w})


def _ok_pth(d):
  import numpy as np
  _fake_torch(d)
  _npz_pth(os.path.join(d, "r18.pth"), {"conv1.weight": np.ones((64, 3, 7, 7), np.float32)})


def _no_torch(d):
  _write(os.path.join(d, "fake", "torch", "__init__.py"),
         "raise ImportError('No module named torch')\n")
  _write(os.path.join(d, "r18.pth"), b"\x80\x02}q\x00.")


def _sidecar_mismatch(d):
  shutil.copy(DEFAULT_CKPT, os.path.join(d, "m.msgpack"))
  _json(os.path.join(d, "m.json"), {"checkpoint": {
      "model": "resnet20", "input_shape": [28, 28, 1], "num_classes": 10, "dataset": "mnist",
      "train_split": "train", "source": None}})
  _json(os.path.join(d, "cfg.json"), _smoke(checkpoint=os.path.join(d, "m.msgpack")))


def _truncate(path: str, keep: int = 40) -> None:
  with open(path, "rb") as f:
    data = f.read()
  _write(path, data[:keep])


@dataclasses.dataclass
class Case:
  """One kind of bad input: the command line and what a clean end looks like.

  ``argv`` / ``absent`` / ``env`` may name ``{d}`` (the case's own directory, the
  command's working directory), ``{run}`` (a copy of a finished tiny run in it) and
  ``{smoke}``.
  """
  name: str
  argv: tuple[str, ...]
  words: tuple[str, ...] = ()
  setup: Callable[[str], None] | None = None
  code: int = 2
  absent: tuple[str, ...] = ()
  pythonpath: str | None = None
  run: bool = False
  holder: bool = False          # this process holds {run}'s lock while the command runs
  stdout_lacks: tuple[str, ...] = ()

  @property
  def needs_run(self) -> bool:
    return self.run or self.holder or any("{run}" in a for a in self.argv)


S = ("search", "--quiet")
CASES = [
    # ---- search: configuration files and values
    Case("config_syntax_error", (*S, "--config", "{d}/bad.py"), ("bad.py:2", "syntax error"),
         lambda d: _write(f"{d}/bad.py", "def get_config():\n  return {'population': 8\n")),
    Case("config_raises", (*S, "--config", "{d}/bad.py"), ("bad.py:3", "KeyError"),
         lambda d: _write(f"{d}/bad.py", "def get_config():\n  d = {}\n  return d['x']\n")),
    Case("variant_without_variants", (*S, "--config", "{smoke}:foo"),
         ("get_config() takes no variant", "foo")),
    Case("json_top_level_array", (*S, "--config", "{d}/c.json"), ("c.json", "JSON object"),
         lambda d: _json(f"{d}/c.json", [1, 2])),
    Case("json_invalid", (*S, "--config", "{d}/c.json"), ("c.json", "not valid JSON"),
         lambda d: _write(f"{d}/c.json", '{"population": ')),
    Case("config_missing", (*S, "--config", "{d}/nope.py"), ("nope.py", "does not exist")),
    Case("config_unknown_key", (*S, "--config", "{d}/c.json"), ("populaton",),
         lambda d: _json(f"{d}/c.json", {"populaton": 8})),
    Case("population_overflow", (*S, "--config", "{smoke}", "--population", str(10**12),
                                 "--out", "{d}/r"), ("population", "2147483647"),
         absent=("{d}/r",)),
    Case("seed_overflow", (*S, "--config", "{smoke}", "--seed", str(2**40), "--out", "{d}/r"),
         ("seed", "0..2147483647"), absent=("{d}/r",)),
    Case("seed_negative", (*S, "--config", "{smoke}", "--seed=-5", "--out", "{d}/r"),
         ("seed=-5", "0..2147483647"), absent=("{d}/r",)),
    Case("generations_negative", (*S, "--config", "{smoke}", "--generations", "-1"),
         ("generations",)),
    Case("out_empty", (*S, "--config", "{smoke}", "--out", ""), ("--out",),
         absent=("{d}/runs",)),
    Case("resume_and_overwrite", (*S, "--resume", "{run}", "--overwrite"),
         ("--resume", "--overwrite")),
    Case("resume_and_other_out", (*S, "--resume", "{run}", "--out", "{d}/other"),
         ("--resume", "--out"), absent=("{d}/other",)),
    Case("resume_without_run", (*S, "--resume", "{d}/nothing"), ("resume", "config.json")),
    Case("search_into_a_run", (*S, "--config", "{smoke}", "--out", "{run}"),
         ("already holds a run", "--overwrite")),
    Case("search_out_under_a_file", (*S, "--config", "{smoke}", "--out", "{d}/file/run"),
         ("out_dir", "file/run"), lambda d: _write(f"{d}/file", "x")),
    Case("search_into_a_library", (*S, "--config", "{smoke}", "--out", "{d}/lib"),
         ("EMOMC library",), lambda d: _json(f"{d}/lib/library.json", {"entries": {}})),
    Case("num_classes_vs_default_checkpoint", (*S, "--config", "{d}/c.json", "--out", "{d}/r"),
         ("checkpoint='default'", "10 classes", "num_classes=100"),
         lambda d: _json(f"{d}/c.json", _smoke(num_classes=100)), absent=("{d}/r",)),
    Case("checkpoint_missing", (*S, "--config", "{d}/c.json", "--out", "{d}/r"),
         ("checkpoint=", "no such file"),
         lambda d: _json(f"{d}/c.json", _smoke(checkpoint=f"{d}/nope.msgpack")),
         absent=("{d}/r",)),
    Case("checkpoint_garbage", (*S, "--config", "{d}/c.json", "--out", "{d}/r"),
         ("g.msgpack", "msgpack"),
         lambda d: (_write(f"{d}/g.msgpack", b"\x00garbage" * 10),
                    _json(f"{d}/c.json", _smoke(checkpoint=f"{d}/g.msgpack"))),
         absent=("{d}/r",)),
    Case("checkpoint_trained_on_other_data", (*S, "--config", "{d}/cfg.json", "--out", "{d}/r"),
         ("dataset='mnist'", "m.json"), _sidecar_mismatch, absent=("{d}/r",)),
    Case("final_split_is_the_training_split", (*S, "--config", "{d}/c.json", "--out", "{d}/r"),
         ("final_split='train'", "trained on"),
         lambda d: _json(f"{d}/c.json", _smoke(final_split="train")), absent=("{d}/r",)),
    Case("factory_raises", (*S, "--config", "{d}/c.json", "--out", "{d}/r"),
         ("f.py:", "RuntimeError", "weights server"),
         lambda d: (_write(f"{d}/f.py", FACTORY),
                    _json(f"{d}/c.json", _smoke(model=f"{d}/f.py:broken"))),
         absent=("{d}/r",)),
    Case("factory_syntax_error", ("layers", "{d}/f.py:make", "--input-shape", "28,28,1"),
         ("f.py:1", "syntax error"), lambda d: _write(f"{d}/f.py", "def make(:\n")),
    Case("factory_wrong_input_shape", ("layers", "{d}/f.py:make", "--input-shape", "32,32,3"),
         ("--input-shape", "input_shape=(32, 32, 3)"), lambda d: _write(f"{d}/f.py", FACTORY)),
    Case("custom_cost_file_missing", (*S, "--config", "{d}/c.json"),
         ("custom_costs", "no such file"),
         lambda d: _json(f"{d}/c.json", _smoke(custom_costs={"x": f"{d}/nope.py:f"}))),
    # ---- costs / layers
    Case("costs_config_is_a_front", ("costs", "resnet20", "--config", "{run}/front.json"),
         ("front.json", "JSON object")),
    Case("costs_uniform_malformed", ("costs", "resnet20", "--uniform", "8"), ("--uniform",)),
    Case("layers_num_classes_zero", ("layers", "resnet20", "--num-classes", "0"),
         ("--num-classes",)),
    Case("layers_unknown_model", ("layers", "resnet21"), ("resnet21", "resnet20")),
    # ---- report
    Case("report_corrupt_front", ("report", "{run}"), ("front.json",),
         lambda d: _truncate(f"{d}/run/front.json"), run=True),
    Case("report_garbage_history", ("report", "{run}"), ("history.csv",),
         lambda d: _write(f"{d}/run/history.csv", "\x00\x01garbage,\n1,2,3\n"), run=True,
         stdout_lacks=("redrew",)),
    Case("report_missing_dir", ("report", "{d}/nothing"), ("run_dir", "nothing")),
    # ---- export
    Case("export_replaces_a_file", ("export", "{run}", "--member", "0", "--out", "{d}/m.npz"),
         ("m.npz", "already exists", "--overwrite"),
         lambda d: _write(f"{d}/m.npz", b"precious")),
    Case("export_replaces_its_json", ("export", "{run}", "--member", "0", "--out", "{d}/m.npz"),
         ("m.npz.json", "already exists"), lambda d: _write(f"{d}/m.npz.json", "{}"),
         absent=("{d}/m.npz",)),
    Case("export_onto_a_directory", ("export", "{run}", "--member", "0", "--out", "{d}/sub"),
         ("sub", "is a directory"), lambda d: os.makedirs(f"{d}/sub")),
    Case("export_into_a_missing_directory",
         ("export", "{run}", "--member", "0", "--out", "{d}/file/m.npz"),
         ("file/m.npz", "directory"), lambda d: _write(f"{d}/file", "x")),
    Case("export_member_out_of_range", ("export", "{run}", "--member", "99"), ("member=99",)),
    Case("export_format_contradicts_out",
         ("export", "{run}", "--member", "0", "--format", "onnx", "--out", "{d}/m.npz"),
         ("format='onnx'", ".npz"), absent=("{d}/m.npz",)),
    Case("export_into_a_locked_run", ("export", "{run}", "--member", "0"),
         ("in use by", f"pid {os.getpid()}", "nemo-jax-test"), holder=True,
         absent=("{run}/member_0.npz",)),
    # ---- train
    Case("train_replaces_a_file", ("train", "--epochs", "1", "--out", "{d}/m.msgpack"),
         ("m.msgpack", "already exists", "--overwrite"),
         lambda d: _write(f"{d}/m.msgpack", b"precious")),
    Case("train_out_unwritable", ("train", "--epochs", "1", "--out", "{d}/file/m.msgpack"),
         ("--out", "file"), lambda d: _write(f"{d}/file", "x")),
    Case("train_out_is_a_directory", ("train", "--epochs", "1", "--out", "{d}/sub"),
         ("--out", "is a directory"), lambda d: os.makedirs(f"{d}/sub")),
    Case("train_epochs_zero", ("train", "--epochs", "0"), ("epochs=0",)),
    Case("train_config_top_level_array", ("train", "--config", "{d}/t.json"),
         ("t.json", "JSON object"), lambda d: _json(f"{d}/t.json", ["resnet20"])),
    # ---- convert (a stand-in torch module reads numpy .pth files)
    Case("convert_nan_weights", ("convert", "{d}/r18.pth", "--model", "resnet18", "--out",
                                 "{d}/r18.msgpack"), ("conv1.weight", "NaN"), _nan_pth,
         absent=("{d}/r18.msgpack", "{d}/r18.json"), pythonpath="{d}/fake"),
    Case("convert_replaces_a_file", ("convert", "{d}/r18.pth", "--model", "resnet18", "--out",
                                     "{d}/m.msgpack"), ("m.msgpack", "already exists"),
         lambda d: (_ok_pth(d), _write(f"{d}/m.msgpack", b"precious")), pythonpath="{d}/fake"),
    Case("convert_without_torch", ("convert", "{d}/r18.pth", "--model", "resnet18"),
         ("PyTorch", "pip install"), _no_torch, pythonpath="{d}/fake",
         absent=("{d}/r18.msgpack",)),
    Case("convert_unknown_model", ("convert", "{d}/r18.pth", "--model", "resnet20"),
         ("resnet20", "mobilenet_v2"), _ok_pth, pythonpath="{d}/fake"),
    Case("convert_missing_file", ("convert", "{d}/nope.pth", "--model", "resnet18"),
         ("nope.pth", "no such file"), _fake_torch, pythonpath="{d}/fake"),
    # ---- prune-library
    Case("prune_library_into_a_run", ("prune-library", "resnet20", "--keep-range", "0.5",
                                      "--out", "{run}", "--steps", "1", "--steps-per-stage",
                                      "1", "--batch-size", "16", "--train-max-images", "64",
                                      "--eval-max-images", "20", "--quiet"),
         ("holds a search run",)),
    Case("prune_library_bad_range", ("prune-library", "resnet20", "--keep-range", "0.9:0.1:0.1",
                                     "--out", "{d}/lib"), ("keep",), absent=("{d}/lib",)),
    Case("prune_library_config_syntax_error",
         ("prune-library", "--config", "{d}/l.py", "--out", "{d}/lib"), ("l.py:1", "syntax"),
         lambda d: _write(f"{d}/l.py", "def get_library_config(:\n"), absent=("{d}/lib",)),
    # ---- finetune
    Case("finetune_members_malformed", ("finetune", "{run}", "--members", "a"), ("--members",)),
    Case("finetune_member_out_of_range", ("finetune", "{run}", "--members", "9"),
         ("member=9",)),
    Case("finetune_missing_run", ("finetune", "{d}/nothing", "--members", "0"), ("run_dir",)),
    Case("finetune_epochs_zero", ("finetune", "{run}", "--members", "0", "--epochs", "0"),
         ("epochs=0",)),
    # ---- emomc-report
    Case("emomc_report_not_a_library_run", ("emomc-report", "{run}"), ("no library",)),
    Case("emomc_report_replaces_a_table", ("emomc-report", "{run}", "--out", "{d}/t"),
         ("emomc_table.json", "already exists"),
         lambda d: _write(f"{d}/t/emomc_table.json", "{}")),
]


def _checksums(root: str) -> dict[str, str]:
  out = {}
  for base, _, files in os.walk(root):
    for f in files:
      path = os.path.join(base, f)
      if os.path.islink(path):
        continue
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


class _Holder:
  """Holds ``DIR/.lock`` the way a running nemo-jax command does (flock + owner JSON),
  without importing the package (the harness also runs against older trees)."""

  def __init__(self, directory: str):
    import fcntl
    self.path = os.path.join(directory, ".lock")
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "command": "nemo-jax-test", "since": "now"}).encode())

  def close(self):
    os.remove(self.path)
    os.close(self.fd)


def _env(pythonpath: str | None = None) -> dict:
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  paths = [p for p in (pythonpath, TREE, env.get("PYTHONPATH")) if p]
  env["PYTHONPATH"] = os.pathsep.join(paths)
  return env


def cli(*argv, cwd, pythonpath=None, timeout=600):
  """``python -m nemo_jax.cli ARGV`` of the tree on ``NEMO_JAX_TREE`` (``cwd`` comes first
  on ``sys.path``: not this repository's when another tree is measured)."""
  return subprocess.run([sys.executable, "-m", "nemo_jax.cli", *argv], capture_output=True,
                        text=True, cwd=cwd, env=_env(pythonpath), timeout=timeout)


def make_shared_run(base: str) -> str:
  """A finished tiny search (smoke config, generation 0 only)."""
  run = os.path.join(base, "shared_run")
  r = cli("search", "--config", SMOKE, "--out", run, "--generations", "0", "--quiet", cwd=base)
  assert r.returncode == 0, r.stderr
  return run


@dataclasses.dataclass
class Outcome:
  case: Case
  returncode: int
  stdout: str
  stderr: str
  changed: list[str]
  present: list[str]
  seconds: float = 0.0

  def problems(self) -> list[str]:
    """Why the end was not clean (empty: clean)."""
    c, out = self.case, []
    if self.returncode != c.code:
      out.append(f"exit status {self.returncode}, expected {c.code}")
    for marker in ("Traceback", "Exception ignored"):
      if marker in self.stderr:
        out.append(f"{marker!r} on stderr")
    errors = [l for l in self.stderr.splitlines() if l.startswith("error:")]
    if c.code == 2:
      if len(errors) != 1:
        out.append(f"{len(errors)} 'error:' lines")
      else:
        missing = [w for w in c.words if w not in errors[0]]
        if missing:
          out.append(f"the error line lacks {missing}")
    for w in c.stdout_lacks:
      if w in self.stdout:
        out.append(f"stdout says {w!r}")
    if self.changed:
      out.append(f"changed or removed: {self.changed}")
    if self.present:
      out.append(f"created: {self.present}")
    return out


def run_case(case: Case, base: str, shared_run: str | None) -> Outcome:
  d = os.path.join(base, case.name)
  os.makedirs(d)
  run = os.path.join(d, "run")
  if case.needs_run:
    shutil.copytree(shared_run, run)
  subst = {"d": d, "run": run, "smoke": SMOKE}
  if case.setup is not None:
    case.setup(d)
  before = _checksums(d)
  holder = _Holder(run) if case.holder else None
  t0 = time.time()
  try:
    r = cli(*(a.format(**subst) for a in case.argv), cwd=d,
            pythonpath=case.pythonpath.format(**subst) if case.pythonpath else None)
  finally:
    if holder is not None:
      holder.close()
  after = _checksums(d)
  changed = sorted(p for p, h in before.items() if after.get(p) != h)
  present = [p.format(**subst) for p in case.absent if os.path.exists(p.format(**subst))]
  return Outcome(case, r.returncode, r.stdout, r.stderr, changed, present, time.time() - t0)


def run_cases(base: str, cases=CASES, workers: int = WORKERS) -> dict[str, Outcome]:
  shared = make_shared_run(base) if any(c.needs_run for c in cases) else None
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {c.name: pool.submit(run_case, c, base, shared) for c in cases}
    return {name: f.result() for name, f in futures.items()}


# --------------------------------------------------------------------------- the kinds

@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
  return run_cases(str(tmp_path_factory.mktemp("bad_input")))


def test_at_least_forty_kinds():
  assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kind_ends_cleanly(outcomes, case):
  o = outcomes[case.name]
  assert not o.problems(), (o.problems(), o.stderr[-3000:])


# --------------------------------------------------------------------------- processes

def _popen(*argv, cwd=REPO):
  return subprocess.Popen([sys.executable, "-m", "nemo_jax.cli", *argv], cwd=cwd,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def test_two_searches_into_one_directory_one_wins(tmp_path):
  out = str(tmp_path / "run")
  argv = ("search", "--config", SMOKE, "--out", out, "--generations", "1", "--quiet")
  procs = [_popen(*argv), _popen(*argv)]
  results = []
  for p in procs:
    out_text, err_text = p.communicate(timeout=600)
    results.append((p.returncode, out_text, err_text))
  codes = sorted(code for code, _, _ in results)
  assert codes == [0, 2], [r[2][-2000:] for r in results]
  loser = next(err for code, _, err in results if code == 2)
  lines = [l for l in loser.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in loser, loser
  winner_pid = next(p.pid for p, (code, _, _) in zip(procs, results) if code == 0)
  assert "is in use by" in lines[0] and f"pid {winner_pid}" in lines[0], lines[0]
  # One complete run: its files whole, no lock left.
  with open(os.path.join(out, "front.json")) as f:
    assert json.load(f)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["config"]["search"]["generations"] == 1
  with open(os.path.join(out, "history.csv")) as f:
    assert len(f.read().splitlines()) == 1 + 2
  assert not os.path.exists(os.path.join(out, ".lock"))


def _steps(run):
  ckpt = os.path.join(run, "checkpoints")
  return sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) if os.path.isdir(ckpt) else []


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
  run = str(tmp_path / "run")
  proc = _popen("search", "--config", SMOKE, "--out", run, "--generations", "50", "--quiet")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None and not _steps(run):
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()[1]
  proc.send_signal(signal.SIGINT)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  t0 = time.time()
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert time.time() - t0 < 30
  assert "Traceback" not in err and "Exception ignored" not in err, err
  lines = [x for x in err.strip().splitlines() if not x.startswith("warning: ")]
  assert len(lines) == 1 and "stopped" in err and "--resume" in err, err
  assert _steps(run) and not os.path.exists(os.path.join(run, ".lock"))


@pytest.fixture
def tiny_tmpfs(tmp_path):
  """An 8 MiB tmpfs (needs root and mount rights)."""
  mnt = tmp_path / "tiny"
  mnt.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                                          str(mnt)], capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here")
  yield str(mnt)
  subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_disk_filling_mid_run_is_one_line_not_library_tracebacks(tiny_tmpfs):
  run = os.path.join(tiny_tmpfs, "run")
  proc = _popen("search", "--config", SMOKE, "--out", run, "--generations", "50", "--quiet")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None and not _steps(run):
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()[1]
  with open(os.path.join(tiny_tmpfs, "filler"), "wb", buffering=0) as f:
    try:
      while True:
        f.write(b"\0" * 65536)
    except OSError:
      pass
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err
  assert "Traceback" not in err and len(err) < 2000, err
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "No space left on device" in lines[0], err
  assert "is intact" in lines[0]


# --------------------------------------------------------------------------- the API

def test_nan_images_are_an_error_naming_the_split_and_image():
  import numpy as np
  import nemo_jax
  x = np.zeros((20, 28, 28, 1), np.float32)
  y = np.arange(20) % 10
  x[7, 3, 3, 0] = np.nan
  with pytest.raises(ValueError, match=r"data\['train'\]: image 7 holds NaN/inf \(1 of 20"):
    nemo_jax.search(SMOKE, data=(x, y), progress=False)
  x[7] = 0
  with pytest.raises(ValueError, match=r"data\['train'\]: label 9 .*num_classes=5"):
    nemo_jax.search(SMOKE, data=(x, y), progress=False, num_classes=5)


def test_nan_weights_of_a_user_model_name_the_layer():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nemo_jax._src.intercept import check_user_model
  import flax.linen as nn
  model = nn.Dense(3)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  kernel = np.array(variables["params"]["kernel"])
  kernel[1, 2] = np.inf
  with pytest.raises(ValueError, match=r"layer 'params/kernel' holds 1 NaN/inf"):
    check_user_model(model, {"params": {"kernel": kernel, "bias": variables["params"]["bias"]}})


def test_convert_rejects_nan_tensors_before_writing(tmp_path, monkeypatch):
  import numpy as np
  from nemo_jax._src import convert
  w = np.ones((64, 3, 7, 7), np.float32)
  w[0, 0, 0, 0] = np.inf
  monkeypatch.setattr(convert, "load_torch_checkpoint", lambda path: {"conv1.weight": w})
  out = tmp_path / "r18.msgpack"
  with pytest.raises(ValueError, match=r"tensor 'conv1.weight' holds 1 NaN/inf"):
    convert.convert_checkpoint("x.pth", "resnet18", out)
  assert not os.listdir(tmp_path)


def test_checkpoint_metadata_is_checked_against_the_config(tmp_path):
  from nemo_jax._src import checkpoint as ckpt
  path = str(tmp_path / "m.msgpack")
  shutil.copy(DEFAULT_CKPT, path)
  meta = ckpt.checkpoint_metadata("resnet20", (28, 28, 1), 10, "fashion_mnist", "train")
  _json(str(tmp_path / "m.json"), {"checkpoint": meta})
  ckpt.load_model("resnet20", path, (28, 28, 1), 10, dataset="fashion_mnist_embedded")
  with pytest.raises(ValueError, match=r"made for num_classes=10 .*num_classes=100"):
    ckpt.load_model("resnet20", path, (28, 28, 1), 100)
  with pytest.raises(ValueError, match=r"made for model='resnet20' .*model='resnet18'"):
    ckpt.load_model("resnet18", path, (28, 28, 1), 10)
  with pytest.raises(ValueError, match=r"trained on dataset='fashion_mnist' .*'mnist'"):
    ckpt.load_model("resnet20", path, (28, 28, 1), 10, dataset="mnist")
  with pytest.raises(ValueError, match=r"final_split='train' is the split .* trained on"):
    ckpt.check_held_out(path, "fashion_mnist_embedded", "train", "final_split")
  ckpt.check_held_out(path, "fashion_mnist_embedded", "test", "final_split")
  # Without metadata the variables' shapes still decide (the classifier's included).
  os.remove(str(tmp_path / "m.json"))
  with pytest.raises(ValueError, match=r"does not match the model.*fc"):
    ckpt.load_model("resnet20", path, (28, 28, 1), 100)


def test_dir_lock_one_owner_stale_takeover_and_cleanup(tmp_path, capsys):
  from nemo_jax._src import faults
  new = str(tmp_path / "new")
  with faults.DirLock(new, "first"):
    assert os.path.isdir(new)
    owner = json.load(open(os.path.join(new, ".lock")))
    assert owner["pid"] == os.getpid() and owner["command"] == "first"
    with pytest.raises(faults.LockedError, match="already in use by this process"):
      faults.DirLock(new, "second").acquire()
  assert not os.path.exists(new)          # created, still empty: removed again
  # A lock file left by a process that is gone (no flock held) is taken over.
  kept = tmp_path / "kept"
  kept.mkdir()
  (kept / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere",
                                          "command": "nemo-jax search", "since": "then"}))
  with faults.DirLock(str(kept), "third"):
    pass
  assert "took over the lock left by pid 999999" in capsys.readouterr().err
  assert os.listdir(kept) == []           # existed before: kept, the lock removed


def test_lock_held_by_another_process_is_named(tmp_path):
  from nemo_jax._src import faults
  holder = _Holder(str(tmp_path))
  try:
    with pytest.raises(faults.LockedError, match=rf"in use by pid {os.getpid()} .*nemo-jax-test"):
      faults.DirLock(str(tmp_path), "mine").acquire()
  finally:
    holder.close()


def test_output_file_checks(tmp_path):
  from nemo_jax._src import faults
  (tmp_path / "a").write_text("x")
  faults.check_output_file(str(tmp_path / "new" / "b.npz"))      # parents created later
  faults.check_output_file(str(tmp_path / "a"), overwrite=True)
  with pytest.raises(ValueError, match="already exists.*--overwrite"):
    faults.check_output_file(str(tmp_path / "a"))
  with pytest.raises(ValueError, match="is a directory"):
    faults.check_output_file(str(tmp_path))
  with pytest.raises(ValueError, match="is not a directory"):
    faults.check_output_file(str(tmp_path / "a" / "b"))
  with pytest.raises(ValueError, match="does not exist"):
    faults.check_output_file(str(tmp_path / "no" / "b"), create_parent=False)
  with pytest.raises(ValueError, match="MiB free"):
    faults.check_output_file(str(tmp_path / "c"), needed_bytes=2**62)


def test_user_errors_and_internal_errors_are_told_apart():
  import errno
  from nemo_jax._src import faults
  assert faults.user_error_message(ValueError("x=1 is invalid\nsecond")) == "x=1 is invalid second"
  msg = faults.user_error_message(OSError(errno.ENOSPC, "No space left on device", "/r/f"))
  assert msg.startswith("/r/f: No space left on device")
  assert faults.user_error_message(FileNotFoundError(2, "No such file", "a.json"))
  assert faults.user_error_message(faults.MissingDependency("pip install x")) == "pip install x"
  assert faults.user_error_message(KeyError("w_bits")) is None
  assert faults.user_error_message(OSError(errno.EIO, "I/O error")) is None


def test_an_internal_error_prints_the_traceback_and_says_it_is_a_bug(capsys, monkeypatch):
  from nemo_jax import cli
  monkeypatch.setattr(cli, "cmd_layers", lambda args: {}["boom"])
  assert cli.main(["layers", "resnet20"]) == 1
  err = capsys.readouterr().err
  assert "Traceback" in err and "internal error: KeyError" in err and "a bug in nemo_jax" in err


def test_public_modules_after_import():
  code = ("import nemo_jax; [getattr(nemo_jax, m).__name__ for m in ('costs', 'data', 'emomc', "
          "'evaluation', 'evolution', 'export', 'models', 'pareto', 'quant')]")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                     env=_env(), timeout=300)
  assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- harness

def main() -> int:
  """Runs every kind against the package on NEMO_JAX_TREE and prints the counts."""
  base = tempfile.mkdtemp(prefix="nemo_jax_bad_input_")
  t0 = time.time()
  results = run_cases(base)
  print(f"(cases: {time.time() - t0:.0f} s with the shared run)")
  clean = 0
  for name, o in results.items():
    problems = o.problems()
    clean += not problems
    print(f"{'clean ' if not problems else 'FAILED'}  {o.seconds:5.1f}s  {name}" +
          ("" if not problems else f"  ({'; '.join(problems)[:300]})"))
    if "-v" in sys.argv:
      lines = [l for l in o.stderr.splitlines() if l.strip()]
      print("          " + (lines[-1][:400] if lines else f"(exit {o.returncode}, no stderr)"))
  print(f"\n{len(results)} kinds tried, {clean} clean, {len(results) - clean} failed "
        f"({TREE}, {time.time() - t0:.0f} s)")
  shutil.rmtree(base, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())


def test_the_cli_prints_nemo_jax_warnings_as_one_stderr_line_and_keeps_stdout_clean(capsys):
  # stdout holds a command's JSON; a warning there broke `nemo-jax export` / `finetune`.
  from nemo_jax import cli
  log = cli._LogCollector().install()
  try:
    warnings.warn_explicit("selection images are training images", UserWarning,
                           os.path.join(os.sep, "x", "nemo_jax", "_src", "run", "search.py"), 7)
    warnings.warn_explicit("a library's deprecation", DeprecationWarning,
                           os.path.join(os.sep, "x", "orbax", "checkpoint.py"), 9)
  finally:
    log.uninstall()
  out, err = capsys.readouterr()
  assert out == ""
  assert err == "warning: selection images are training images\n"
  assert any("a library's deprecation" in line for line in log.lines)
