"""Checkpoints of long jobs: written whole or not at all, restored from the newest good step.

One implementation for every job that checkpoints (the search loop, fine-tuning, the
EMOMC library trainer; ``docs/DESIGN.md``, "Faults"):

* :func:`save_step` writes a step and waits for it before the job goes on, so a stop or
  a failure never leaves a half-written newest step; a failed write is a
  :class:`~nemo_jax._src.faults.CheckpointWriteError` naming what is still intact;
* :func:`restore_newest_good` restores the newest step that restores completely and
  names the steps it skipped; :func:`set_aside` moves damaged newer steps out of the way
  (kept for inspection);
* :func:`check_resume_settings`: a resumed job keeps its settings.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from typing import Any, Callable, Sequence

import orbax.checkpoint as ocp

from nemo_jax._src.faults import CheckpointWriteError


def checkpoint_manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """The orbax manager of a job's checkpoint directory (created if needed)."""
  return ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True))


def write_failed(what: str, error: Exception, kept: str) -> CheckpointWriteError:
  """The one error of a failed checkpoint write: what failed, why, what is intact."""
  reason = str(error).splitlines()[0][:200] if str(error) else ""
  return CheckpointWriteError(f"writing {what} failed ({type(error).__name__}: {reason}); "
                              f"{kept}")


def save_step(manager: ocp.CheckpointManager, step: int, args) -> None:
  """Writes checkpoint ``step`` completely; on failure the previous step stays intact.

  Raises:
    CheckpointWriteError naming the step and the previous step still intact.
  """
  try:
    manager.save(step, args=args)
    # Finished before the next step starts: a stop or a failure never leaves a
    # half-written newest step, and write errors surface here, at their step.
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001 - orbax wraps OS errors in several types
    previous = [s for s in manager.all_steps() if s < step]
    kept = (f"the previous checkpoint (step {max(previous)}) is intact; free space and "
            "resume with --resume" if previous else "no earlier checkpoint exists")
    raise write_failed(f"checkpoint step {step} to {manager.directory}", e, kept) from e


def save_tree(path: str, tree, kept: str) -> None:
  """Writes one pytree checkpoint at ``path`` (replacing it) and waits for it.

  Raises:
    CheckpointWriteError naming ``path`` and ``kept`` (what is still intact).
  """
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(os.path.abspath(path), tree, force=True)
    checkpointer.wait_until_finished()
  except Exception as e:  # noqa: BLE001 - orbax wraps OS errors in several types
    raise write_failed(f"checkpoint {path}", e, kept) from e


def restore_newest_good(steps: Sequence[int], restore: Callable[[int], Any],
                        directory: str) -> tuple[int, Any, list[str]]:
  """Restores the newest step that restores completely.

  Args:
    steps: the available checkpoint steps.
    restore: ``step -> restored`` raising on a damaged step.
    directory: the checkpoint directory (for messages).

  Returns:
    ``(step, restored, problems)``; ``problems`` describes each newer step skipped
    (a warning is issued for them).

  Raises:
    ValueError: no step restores; names the directory and what each step lacked.
  """
  problems = []
  for step in sorted(steps, reverse=True):
    try:
      restored = restore(step)
    except Exception as e:  # noqa: BLE001 - any damage: try the previous step
      problems.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      continue
    if problems:
      warnings.warn(f"{directory}: newer checkpoint(s) could not be restored "
                    f"({'; '.join(problems)}); resumed from step {step}", stacklevel=2)
    return step, restored, problems
  detail = "; ".join(problems) if problems else "no checkpoint step at all"
  raise ValueError(f"resume: no checkpoint in {directory!r} restores completely ({detail}); "
                   "allowed: a run directory with at least one intact checkpoint (start a "
                   "new run without --resume)")


def set_aside(manager: ocp.CheckpointManager, after: int, destination: str) -> list[int]:
  """Moves the steps newer than ``after`` (damaged ones) to ``destination``; returns them.

  They are kept for inspection, out of the way of the steps to come.
  """
  damaged = [s for s in manager.all_steps() if s > after]
  if damaged:
    os.makedirs(destination, exist_ok=True)
    for s in damaged:
      shutil.move(os.path.join(str(manager.directory), str(s)),
                  os.path.join(destination, f"{s}.{int(time.time())}"))
    manager.reload()
  return damaged


def check_resume_settings(new: dict, saved: dict, allowed: Sequence[str], directory: str,
                          how: str) -> None:
  """A resumed job keeps its settings: any field outside ``allowed`` that differs is an error.

  Args:
    new, saved: the settings asked for now and those the job was made with.
    allowed: fields a resume may change.
    directory: the job's directory (for the message).
    how: what the user can do instead (e.g. "start a new run in another directory").

  Raises:
    ValueError naming the first differing field and both values.
  """
  for k in sorted(new):
    if k not in allowed and saved.get(k) != new[k]:
      raise ValueError(f"resume: {k}={new[k]!r} differs from the run in {directory!r}, which "
                       f"was made with {k}={saved.get(k)!r}; a resumed run keeps its settings "
                       f"(allowed overrides: {', '.join(allowed)}); {how}")
