"""Faults during long runs: stop signals, unwritable or full disks, damaged checkpoints.

Every long job (``search``, ``prune-library``, ``finetune``) follows the same rules
(``docs/DESIGN.md``, "Faults"):

* a stop signal (SIGINT / SIGTERM) never interrupts a checkpoint: :class:`GracefulStop`
  records it and the job stops at its next step boundary, after the step's checkpoint is
  complete, raising :class:`StopRequested`; the CLI prints one line saying how to resume
  and exits with ``128 + signal`` (130 / 143). A second signal stops at once (the last
  complete checkpoint is still intact);
* the output directory is probed before any work starts (:func:`probe_writable`): an
  unwritable directory or a disk without room for a checkpoint is a clear error;
* a failed checkpoint write mid-run leaves the previous checkpoint intact and says so
  (:class:`CheckpointWriteError`; writing and restoring checkpoints: ``run/checkpoint.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from typing import Any, Callable

import jax
import numpy as np

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PROBE_BYTES = 64 * 1024


class StopRequested(Exception):
  """A stop signal arrived; the job stopped at a step boundary with its work saved.

  Attributes:
    signum: the signal number (exit status ``128 + signum``).
    resume_hint: one line telling the user how to continue.
  """

  def __init__(self, signum: int, resume_hint: str = ""):
    self.signum = int(signum)
    self.resume_hint = resume_hint
    name = signal.Signals(self.signum).name
    super().__init__(f"stopped by {name}" + (f"; {resume_hint}" if resume_hint else ""))

  @property
  def exit_status(self) -> int:
    return 128 + self.signum


class CheckpointWriteError(ValueError):
  """Writing a checkpoint failed; the previous one is intact (the message says which)."""


class GracefulStop:
  """Context manager deferring SIGINT / SIGTERM to the job's next step boundary.

  ``with GracefulStop(hint) as stop: ... stop.check()`` after each step's checkpoint.
  Outside the main thread (where Python cannot install handlers) it records nothing.

  Args:
    resume_hint: what :class:`StopRequested` tells the user (e.g. the resume command).
  """

  def __init__(self, resume_hint: str = ""):
    self.resume_hint = resume_hint
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def _handler(self, signum, frame):
    if self.signum is not None:  # the second signal: stop now
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self) -> "GracefulStop":
    if threading.current_thread() is threading.main_thread():
      for s in STOP_SIGNALS:
        self._previous[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def check(self) -> None:
    """Raises :class:`StopRequested` if a stop signal arrived."""
    if self.signum is not None:
      raise StopRequested(self.signum, self.resume_hint)


def probe_writable(path: str, needed_bytes: int = 0, what: str = "out_dir") -> None:
  """Checks before any work that ``path`` (created if needed) takes files and has room.

  Writes and removes a small file (fsynced), then compares the free space with
  ``needed_bytes`` (e.g. two checkpoints) plus the probe.

  Raises:
    ValueError naming the directory, the OS error and what is needed.
  """
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".nemo_jax_probe_", dir=path)
    try:
      with os.fdopen(fd, "wb") as f:
        f.write(b"\0" * PROBE_BYTES)
        f.flush()
        os.fsync(f.fileno())
    finally:
      os.remove(probe)
  except OSError as e:
    raise ValueError(f"{what}={path!r} is not writable ({e.strerror or e}); allowed: a "
                     "directory this user can write, on a disk with free space") from None
  free = shutil.disk_usage(path).free
  if needed_bytes and free < needed_bytes:
    raise ValueError(f"{what}={path!r}: {free / 2**20:.1f} MiB free on its disk, the run "
                     f"needs about {needed_bytes / 2**20:.1f} MiB for its checkpoints; "
                     "allowed: a disk with more free space")


def write_atomic(path: str, write: Callable[[Any], Any], mode: str = "wb") -> None:
  """Writes a file through ``write(f)`` on a temporary sibling, then renames it.

  An interrupted or failed write never leaves a half-written file: the previous one (if
  any) stays until the rename, which is atomic on one file system.

  Args:
    path: the file to (re)write.
    write: called once with the open temporary file.
    mode: ``"wb"`` (bytes) or ``"w"`` (text).
  """
  tmp = f"{path}.tmp"
  try:
    with open(tmp, mode) as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj, indent: int = 1) -> None:
  """Writes ``obj`` as indented JSON, atomically (:func:`write_atomic`)."""
  write_atomic(path, lambda f: json.dump(obj, f, indent=indent), mode="w")


def check_finite(tree, what: str) -> None:
  """Rejects variables whose arrays hold NaN or inf, naming the first offending leaf.

  Args:
    tree: nested dict of arrays (model variables).
    what: the file or source, for the message.
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    arr = np.asarray(leaf)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
      name = "/".join(str(getattr(k, "key", k)) for k in path)
      bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
      raise ValueError(f"{what}: layer {name!r} holds {bad} NaN/inf value(s); allowed: "
                       "finite weights (re-export or retrain the checkpoint)")
