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
  (:class:`CheckpointWriteError`; writing and restoring checkpoints: ``run/checkpoint.py``);
* a directory has one writer: :class:`DirLock` (``DIR/.lock``, the owner's pid, host,
  command and start time; a lock left by a process that is gone is taken over, saying so);
* an output file is checked before any work (:func:`check_output_file`): it is not a
  directory, its directory takes files, and an existing file is replaced only when asked;
* non-finite inputs are errors naming where they are (:func:`check_finite`,
  :func:`check_finite_images`);
* :func:`user_error_message` tells a user's mistake (a bad value, a file that cannot be
  read or written) from an internal error (the CLI prints the first as one line).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterable

try:
  import fcntl
except ImportError:  # not POSIX: the lock falls back to an exclusive create
  fcntl = None

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
    _SIGNALS["seen"] += 1
    if self.signum is not None:  # the second signal: stop now
      if _SIGNALS["exit_at_once"]:
        exit_now(signum, self.resume_hint)
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


class Interrupted(KeyboardInterrupt):
  """A stop signal outside a step loop (the CLI process's handler): stop now.

  Attributes:
    signum: the signal number (exit status ``128 + signum``).
  """

  def __init__(self, signum: int):
    self.signum = int(signum)
    super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

  @property
  def exit_status(self) -> int:
    return 128 + self.signum


_SIGNALS = {"seen": 0, "exit_at_once": False}
"""Process state of the stop signals: how many arrived, and whether a second one ends the
process at once (the CLI process, :func:`install_process_signals`)."""


def exit_now(signum: int, hint: str = "", status: int | None = None) -> None:
  """Ends the process at once: releases this process's directory locks, prints one line
  and exits with ``128 + signum`` (no Python shutdown, hence no traceback from it).

  Checkpoints and result files are written to a temporary name and renamed, so what is
  on disk is what a ``kill -9`` leaves: the last complete checkpoint.
  """
  release_all_locks()
  name = signal.Signals(signum).name
  msg = (f"stopped at once by {name} (a second signal); the last complete checkpoint is "
         "intact" + (f"; {hint}" if hint else ""))
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  try:
    os.write(2, (msg + "\n").encode())
  except OSError:
    pass
  os._exit(128 + signum if status is None else status)


def install_process_signals() -> None:
  """For a command-line process (main thread only): a stop signal outside a step loop
  raises :class:`Interrupted` (exit ``128 + signal``); any further signal, inside a
  loop (:class:`GracefulStop`) or not, ends the process at once (:func:`exit_now`), so
  a second Ctrl-C never waits for the work in progress nor prints a traceback."""
  if threading.current_thread() is not threading.main_thread():
    return
  _SIGNALS["exit_at_once"] = True

  def handler(signum, frame):
    _SIGNALS["seen"] += 1
    if _SIGNALS["seen"] > 1:
      exit_now(signum)
    raise Interrupted(signum)

  for s in STOP_SIGNALS:
    signal.signal(s, handler)


def exit_at_once_on_signals(status: int) -> None:
  """For a command-line process that is finishing with ``status``: a stop signal during
  the interpreter's shutdown ends it at once with that status (no "Exception ignored"
  traceback from a thread being joined)."""
  if threading.current_thread() is not threading.main_thread():
    return

  def handler(signum, frame):
    release_all_locks()
    os._exit(status)

  for s in STOP_SIGNALS:
    signal.signal(s, handler)


def _write_probe(directory: str) -> None:
  """Writes, syncs and removes a ``PROBE_BYTES`` file in ``directory`` (raises OSError)."""
  fd, probe = tempfile.mkstemp(prefix=".nemo_jax_probe_", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(b"\0" * PROBE_BYTES)
      f.flush()
      os.fsync(f.fileno())
  finally:
    os.remove(probe)


def probe_writable(path: str, needed_bytes: int = 0, what: str = "out_dir") -> None:
  """Checks before any work that ``path`` (created if needed) takes files and has room.

  Writes and removes a small file (fsynced), then compares the free space with
  ``needed_bytes`` (e.g. two checkpoints) plus the probe.

  Raises:
    ValueError naming the directory, the OS error and what is needed.
  """
  try:
    os.makedirs(path, exist_ok=True)
    _write_probe(path)
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
  except OSError as e:
    if e.filename is None:  # e.g. a full disk on write(): say which file
      raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from e
    raise
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


def check_finite_images(images, where: str) -> None:
  """Rejects images holding NaN or inf, naming the first offending image.

  Args:
    images: ``[N, ...]`` array (float; integer images are always finite).
    where: what they are, for the message (e.g. ``"data['train']"``).
  """
  arr = np.asarray(images)
  if not np.issubdtype(arr.dtype, np.floating):
    return
  finite = np.isfinite(arr.reshape(len(arr), -1)).all(axis=1) if arr.ndim else np.isfinite(arr)
  if not np.all(finite):
    bad = np.flatnonzero(~finite)
    raise ValueError(f"{where}: image {int(bad[0])} holds NaN/inf ({len(bad)} of {len(arr)} "
                     "images do); allowed: finite values (drop or repair those images)")


# --------------------------------------------------------------------------- output files

def _nearest_existing(path: str) -> str:
  while path and not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def check_output_file(path, overwrite: bool = False, what: str = "--out",
                      needed_bytes: int = 0, create_parent: bool = True,
                      extra: Iterable[str] = ()) -> str:
  """Before any work: an output file can be written and replaces nothing unasked.

  Checks that ``path`` (and the companion files ``extra``, e.g. its ``.json``) is not a
  directory, that none exists unless ``overwrite``, and that its directory (or, with
  ``create_parent``, the nearest existing parent) takes a file and has room for
  ``needed_bytes``. Creates nothing.

  Returns:
    ``path`` as a string.

  Raises:
    ValueError naming ``what``, the path and what is allowed.
  """
  path = os.fspath(path) if path is not None else ""
  if not path:
    raise ValueError(f"{what}={path!r} is invalid; allowed: a file path")
  for p in (path, *extra):
    if os.path.isdir(p):
      raise ValueError(f"{what}={path!r}: {p!r} is a directory; allowed: a file path "
                       f"(e.g. {os.path.join(p, os.path.basename(path) or 'out')})")
    if os.path.lexists(p) and not overwrite:
      raise ValueError(f"{what}={path!r}: {p!r} already exists; allowed: --overwrite "
                       "(overwrite=True) to replace it, or another path")
  parent = os.path.dirname(os.path.abspath(path))
  existing = _nearest_existing(parent)
  if existing != parent and not create_parent:
    raise ValueError(f"{what}={path!r}: directory {parent!r} does not exist; allowed: a "
                     "path in an existing directory")
  if not os.path.isdir(existing):
    raise ValueError(f"{what}={path!r}: {existing!r} is not a directory; allowed: a path "
                     "whose parents are directories")
  try:
    _write_probe(existing)
  except OSError as e:
    raise ValueError(f"{what}={path!r}: {existing!r} is not writable ({e.strerror or e}); "
                     "allowed: a directory this user can write, on a disk with free "
                     "space") from None
  free = shutil.disk_usage(existing).free
  if needed_bytes and free < needed_bytes:
    raise ValueError(f"{what}={path!r}: {free / 2**20:.1f} MiB free on its disk, the file "
                     f"needs about {needed_bytes / 2**20:.1f} MiB; allowed: a disk with "
                     "more free space")
  return path


# --------------------------------------------------------------------------- directory locks

LOCK_FILE = ".lock"

_HELD: dict[str, "DirLock"] = {}
"""The directory locks this process holds (real path -> lock)."""


class LockedError(ValueError):
  """Another live process owns the directory (the message names it and what to do)."""


def _process_start(pid: int) -> str | None:
  """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(owner: dict) -> bool | None:
  """Whether the lock's owner still runs: True / False, None when it cannot be told
  (another host)."""
  if owner.get("host") != socket.gethostname():
    return None
  try:
    pid = int(owner["pid"])
    os.kill(pid, 0)
  except (KeyError, TypeError, ValueError):
    return False
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # it exists (another user's)
  start = owner.get("pid_start")
  return start is None or _process_start(pid) in (None, start)


def _describe(owner: dict | None) -> str:
  if not owner:
    return "an unknown process (its lock file is empty or unreadable)"
  return (f"pid {owner.get('pid')} on host {owner.get('host')!r} "
          f"(`{owner.get('command')}`, since {owner.get('since')})")


class DirLock:
  """An exclusive lock on a directory: one writer at a time (``docs/DESIGN.md``, "Faults").

  ``with DirLock(path, "nemo-jax search"):`` creates ``path`` if needed and holds
  ``path/.lock`` (an ``flock`` on a file naming the owner: pid, host, command, start
  time) until the block ends, also on an exception or a stop. A second writer gets a
  :class:`LockedError` naming the owner. A lock whose owner is gone (killed, crashed) is
  taken over with a note on stderr. A directory the lock created is removed again when
  it is still empty at release (a command that failed leaves nothing behind).

  Args:
    path: the directory.
    command: what holds it (shown to a second writer).
    what: the field or flag that named the directory, for messages.
    create: create the directory if missing (else a missing one is an error).
  """

  def __init__(self, path, command: str, what: str = "out_dir", create: bool = True):
    self.path = os.fspath(path)
    self.command = command
    self.what = what
    self.create = create
    self.file = os.path.join(self.path, LOCK_FILE)
    self._fd: int | None = None
    self._created = False
    self._key: str | None = None

  def __enter__(self) -> "DirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def _info(self) -> bytes:
    pid = os.getpid()
    return json.dumps({"pid": pid, "host": socket.gethostname(), "command": self.command,
                       "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "pid_start": _process_start(pid)}).encode()

  def _locked(self, owner) -> LockedError:
    return LockedError(f"{self.what}={self.path!r} is in use by {_describe(owner)}; "
                       "allowed: wait until it finishes, or another directory (if that "
                       f"process is gone and the lock remains, delete {self.file})")

  def acquire(self) -> None:
    """Takes the lock (module docstring); raises LockedError / ValueError."""
    if not self.path:
      raise ValueError(f"{self.what}='' is invalid; allowed: a directory path")
    if not os.path.isdir(self.path):
      if os.path.exists(self.path):
        raise ValueError(f"{self.what}={self.path!r} is a file; allowed: a directory")
      if not self.create:
        raise ValueError(f"{self.what}={self.path!r}: no such directory")
      try:
        os.makedirs(self.path)
        self._created = True
      except FileExistsError:
        pass
      except OSError as e:
        raise ValueError(f"{self.what}={self.path!r} cannot be created ({e.strerror or e}); "
                         "allowed: a directory this user can write") from None
    key = os.path.realpath(self.path)
    if key in _HELD:
      self._cleanup_dir()
      raise LockedError(f"{self.what}={self.path!r} is already in use by this process "
                        f"(`{_HELD[key].command}`); allowed: one writer at a time")
    try:
      taken_over = self._lock_flock() if fcntl is not None else self._lock_exclusive()
    except LockedError:
      self._cleanup_dir()
      raise
    except OSError as e:
      self._cleanup_dir()
      raise ValueError(f"{self.what}={self.path!r} is not writable ({e.strerror or e}); "
                       "allowed: a directory this user can write") from None
    self._key = key
    _HELD[key] = self
    if taken_over:
      print(f"note: {self.what}={self.path!r}: took over the lock left by "
            f"{_describe(taken_over)}, which is no longer running", file=sys.stderr)

  def _read(self, fd: int) -> dict | None:
    try:
      data = os.pread(fd, 4096, 0)
      owner = json.loads(data.decode()) if data else None
      return owner if isinstance(owner, dict) else None
    except (OSError, ValueError):
      return None

  def _lock_flock(self) -> dict | None:
    """flock on the lock file (released by the kernel when the owner dies)."""
    for _ in range(10):
      fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        owner = self._read(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise self._locked(owner) from None
        if owner is None and os.path.getsize(self.file) == 0:
          os.remove(self.file)   # the empty file just created: the fallback creates it
        return self._lock_exclusive()  # a file system without flock
      try:  # the file we locked is still the lock file (not removed by a releasing owner)
        same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      previous = self._read(fd)
      try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._info(), 0)
        os.fsync(fd)
      except OSError:  # e.g. a full disk: give the lock back, say why
        self._drop(fd)
        raise
      self._fd = fd
      return previous
    raise LockedError(f"{self.what}={self.path!r}: its lock keeps changing hands; allowed: "
                      "one writer at a time")

  def _lock_exclusive(self) -> dict | None:
    """Exclusive create of the lock file; a lock whose owner is gone is taken over."""
    taken_over = None
    for _ in range(3):
      try:
        fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
      except FileExistsError:
        try:
          with open(self.file) as f:
            owner = json.load(f)
        except (OSError, ValueError):
          owner = None
        if owner is None:
          try:
            age = time.time() - os.path.getmtime(self.file)
          except OSError:
            continue
          if age < 10:   # being written right now
            raise self._locked(owner) from None
        elif _alive(owner) is not False:
          raise self._locked(owner) from None
        taken_over = owner or {"pid": "?", "host": "?", "command": "?", "since": "?"}
        try:
          os.remove(self.file)
        except FileNotFoundError:
          pass
        continue
      try:
        os.write(fd, self._info())
        os.fsync(fd)
      except OSError:
        self._drop(fd)
        raise
      self._fd = fd
      return taken_over
    raise LockedError(f"{self.what}={self.path!r}: its lock keeps changing hands; allowed: "
                      "one writer at a time")

  def _drop(self, fd: int) -> None:
    """Removes the lock file this process just created and could not fill, and closes it."""
    try:
      if os.stat(self.file).st_ino == os.fstat(fd).st_ino:
        os.remove(self.file)
    except OSError:
      pass
    os.close(fd)

  def release(self) -> None:
    """Removes the lock (and the directory, if this lock created it and it is empty)."""
    if self._fd is not None:
      try:
        if os.stat(self.file).st_ino == os.fstat(self._fd).st_ino:
          os.remove(self.file)
      except OSError:
        pass
      try:
        os.close(self._fd)
      except OSError:
        pass
      self._fd = None
    if self._key is not None:
      _HELD.pop(self._key, None)
      self._key = None
    self._cleanup_dir()

  def _cleanup_dir(self) -> None:
    if self._created:
      try:
        os.rmdir(self.path)   # only when empty
      except OSError:
        pass
      self._created = False


def release_all_locks() -> None:
  """Releases every directory lock this process holds (before an immediate exit)."""
  for lock in list(_HELD.values()):
    lock.release()


# --------------------------------------------------------------------------- user errors

class MissingDependency(ImportError):
  """An optional dependency a command needs is not installed (the message says how)."""


USER_ERRNOS = frozenset(getattr(errno, n) for n in (
    "ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "ENOENT", "EISDIR", "ENOTDIR",
    "EEXIST", "ENAMETOOLONG", "ENOTEMPTY", "EFBIG", "ELOOP") if hasattr(errno, n))
"""OS errors caused by the user's files or disk (not by the package)."""


def user_error_message(e: BaseException) -> str | None:
  """The one-line message of a user-caused failure, or None for an internal error.

  User errors: ``ValueError`` (every validation in the package), an ``OSError`` on a
  named file or of a kind the user's disk causes (full, read-only, missing, a directory
  where a file belongs), a missing optional dependency.
  """
  if isinstance(e, ValueError):
    text = str(e)
  elif isinstance(e, MissingDependency):
    text = str(e)
  elif isinstance(e, OSError) and (e.filename is not None or e.errno in USER_ERRNOS):
    where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    reason = e.strerror or (str(e.args[0]) if e.args else type(e).__name__)
    text = (f"{where}: {reason}" if where is not None else reason) + (
        "; allowed: a file this user can read and write, on a disk with free space")
  else:
    return None
  text = " ".join(line.strip() for line in text.splitlines() if line.strip())
  return text or type(e).__name__
