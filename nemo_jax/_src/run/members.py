"""Front members of a finished run: rebuilt as (problem, config), and exported.

:func:`load_run_member` rebuilds the problem of a run directory and one front member's
``QuantConfig`` (export and fine-tuning start from it); :func:`export_member` writes
that member as packed integers or ONNX (``export.py``; ``docs/DESIGN.md``, "Export").
"""

from __future__ import annotations

import contextlib
import os
from typing import Mapping

import jax
import numpy as np

from nemo_jax._src import export as export_lib
from nemo_jax._src import faults
from nemo_jax._src.problem import Problem
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.run.rundir import CONFIG_FILE, FRONT_FILE, FrontMember, RunDir
from nemo_jax._src.run.search import build_problem


def load_run_member(run_dir: str, member: int, progress: bool = False,
                    problem: Problem | None = None
                    ) -> tuple[Problem, QuantConfig, FrontMember]:
  """The problem and the validated configuration of front member ``member`` of a run.

  Args:
    run_dir: a ``nemo-jax search`` output directory (``config.json``, ``front.json``).
    member: index into ``front.json``.
    progress: show progress bars (library loading).
    problem: the run's ``Problem`` if already built (another member of the same run).

  Returns:
    ``(problem, config, entry)``: the run's ``Problem`` (model, source, scheme,
    calibration, workload), one member ``QuantConfig`` and its typed ``front.json``
    entry.

  Raises:
    ValueError: a missing directory / file, an unreadable file or a member index out of
      range.
  """
  run = RunDir(run_dir)
  run.require(CONFIG_FILE, FRONT_FILE)
  front = run.read_front()
  if (isinstance(member, bool) or not isinstance(member, (int, np.integer))
      or not 0 <= member < len(front)):
    raise ValueError(f"member={member!r} is invalid; allowed: an integer in "
                     f"0..{len(front) - 1} ({len(front)} front members in {run_dir})")
  entry = front[int(member)]
  if problem is None:
    problem = build_problem(run.read_config(), progress=progress)
  configs = problem.configs([entry.keep], [entry.w_bits], [entry.a_bits])
  config = jax.tree.map(lambda x: x[0], configs)
  return problem, config, entry


def export_problem_member(problem: Problem, config: QuantConfig, format: str, out: str,
                          extra: Mapping | None = None) -> dict:
  """Exports one configuration of a problem (a run's model, source and scheme)."""
  if format not in export_lib.FORMATS:
    raise ValueError(f"format={format!r} is invalid; allowed: {list(export_lib.FORMATS)}")
  source = problem.source
  member = export_lib.quantize_member(source.model, source.variables, problem.scheme, config,
                                      source.input_shape)
  spec = {"model": problem.cfg.model, "input_shape": list(source.input_shape),
          "num_classes": source.num_classes, "placement": problem.cfg.quant.placement}
  if format == "npz":
    return export_lib.save_npz(out, member, spec, extra)
  return export_lib.save_onnx(out, source.model, member, spec, extra)


def export_member(run_dir: str, member: int, *, format: str = "npz",
                  out: str | None = None, overwrite: bool = False) -> dict:
  """Exports front member ``member`` of a search run as integers (``export.py``).

  Args:
    run_dir: a finished ``nemo-jax search`` directory.
    member: index into its ``front.json``.
    format: ``"npz"`` (packed integers) or ``"onnx"`` (QDQ model).
    out: the output file (default ``RUN_DIR/member_K.FORMAT``); ``OUT.json`` gets the
      precision JSON.
    overwrite: replace ``out`` / ``OUT.json`` if they exist (default: refuse).

  Returns:
    The precision dict, with ``out`` and the member's ``objectives`` / ``metrics``.

  Raises:
    ValueError: a bad run directory, member index or format, an ``out`` that exists
      (without ``overwrite``), is a directory or cannot be written, or a run directory
      another process is writing (``faults.LockedError``).
  """
  if format not in export_lib.FORMATS:
    raise ValueError(f"format={format!r} is invalid; allowed: {list(export_lib.FORMATS)}")
  run = RunDir(run_dir)
  run.require(CONFIG_FILE, FRONT_FILE)
  if out is not None and out == "":
    raise ValueError("out='' is invalid; allowed: a file path (or None for RUN_DIR/member_K."
                     "FORMAT)")
  out = out or os.path.join(run_dir, f"member_{member}.{format}")
  for other in export_lib.FORMATS:
    if other != format and out.lower().endswith("." + other):
      raise ValueError(f"out={out!r} ends in .{other} but format={format!r}; allowed: an out "
                       f"file ending in .{format} (or --format {other})")
  # Before any work: the file replaces nothing unasked, and its directory takes files.
  faults.check_output_file(out, overwrite, "out", create_parent=False,
                           extra=(out + ".json",))
  parent, root = (os.path.realpath(os.path.dirname(os.path.abspath(out))),
                  os.path.realpath(run_dir))
  inside = parent == root or parent.startswith(root + os.sep)
  # Writing into the run: one writer at a time (not while a search resumes there).
  with (run.lock("nemo-jax export", "run_dir", create=False) if inside
        else contextlib.nullcontext()):
    problem, config, entry = load_run_member(run_dir, member)
    extra = {"source": {"run_dir": os.path.abspath(run_dir), "member": int(member)},
             "objectives": dict(entry.objectives), "metrics": dict(entry.metrics)}
    info = export_problem_member(problem, config, format, out, extra)
  info["out"] = out
  return info
