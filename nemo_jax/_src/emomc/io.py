"""EMOMC stage I files: ``library.json`` and one orbax checkpoint per keep ratio.

Files in a library directory: ``library.json`` (format, model, settings, and per ratio
its accuracy, non-zero counts and checkpoint directory) and ``checkpoints/<id>/``
(orbax ``StandardCheckpointer``, ``id = round(p * 10000)``). The trained model itself
is entry ``p = 1.0``. Keep ratios are identified by 4 decimals.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from nemo_jax._src.faults import check_finite

LIBRARY_FORMAT = "nemo_jax.emomc_library.v1"
LIBRARY_FILE = "library.json"
CHECKPOINT_DIR = "checkpoints"
RATIO_DECIMALS = 4            # keep ratios are identified by round(p * 10^4)
DENSE_KEEP = 1.0


def ratio_id(keep: float) -> int:
  """Integer id of a keep ratio (``round(p * 10000)``), used as checkpoint name."""
  return int(round(float(keep) * 10**RATIO_DECIMALS))


def ratio_key(keep: float) -> str:
  """The ``library.json`` key of a keep ratio (4 decimals, e.g. ``"0.2500"``)."""
  return f"{ratio_id(keep) / 10**RATIO_DECIMALS:.{RATIO_DECIMALS}f}"


def check_keep_ratios(ratios: Sequence[float], field: str = "keep_ratios") -> tuple[float, ...]:
  """Validates keep ratios (in (0, 1], distinct at 4 decimals); returns them rounded, sorted.

  Raises:
    ValueError naming the field and the offending value.
  """
  if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios:
    raise ValueError(f"{field}={ratios!r} is invalid; allowed: a non-empty list of numbers "
                     "in (0, 1]")
  out = []
  for p in ratios:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) \
        or not math.isfinite(float(p)) or not 0 < float(p) <= 1:
      raise ValueError(f"{field}: keep ratio {p!r} is invalid; allowed: numbers in (0, 1]")
    if ratio_id(p) == 0:
      raise ValueError(f"{field}: keep ratio {p!r} rounds to 0 at {RATIO_DECIMALS} decimals; "
                       "allowed: >= 0.0001")
    out.append(ratio_id(p) / 10**RATIO_DECIMALS)
  if len(set(out)) != len(out):
    dup = sorted({p for p in out if out.count(p) > 1})
    raise ValueError(f"{field}: keep ratio(s) {dup} given twice; allowed: distinct ratios")
  return tuple(sorted(out))


def parse_keep_range(text: str) -> tuple[float, ...]:
  """``"0.2:0.8:0.05"`` (start:stop:step, stop included) or ``"0.3,0.5"`` -> ratios.

  Raises:
    ValueError naming the text and the expected form.
  """
  form = "START:STOP:STEP (e.g. 0.2:0.8:0.01, STOP included) or a list 0.3,0.5"
  text = str(text).strip()
  try:
    if ":" in text:
      start, stop, step = (float(v) for v in text.split(":"))
      if not (0 < start <= stop <= 1) or not step > 0:
        raise ValueError
      n = int(math.floor((stop - start) / step + 1e-9)) + 1
      ratios = [start + i * step for i in range(n)]
    else:
      ratios = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"--keep-range {text!r} is invalid; allowed: {form} with 0 < START <= "
                     "STOP <= 1 and STEP > 0") from None
  return check_keep_ratios(ratios, "--keep-range")


def _abs(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))


def _checkpointer() -> ocp.StandardCheckpointer:
  return ocp.StandardCheckpointer()


def entry_dir(keep: float) -> str:
  """The checkpoint directory of a keep ratio's entry, relative to the library."""
  return os.path.join(CHECKPOINT_DIR, str(ratio_id(keep)))


def read_library(library_dir: str) -> dict:
  """The parsed ``library.json`` of a library directory.

  Raises:
    ValueError: no library there, or an unknown format.
  """
  path = os.path.join(library_dir, LIBRARY_FILE)
  if not os.path.exists(path):
    raise ValueError(f"library={library_dir!r}: no {LIBRARY_FILE} there; build one with "
                     "`nemo-jax prune-library MODEL --keep-range 0.2:0.8:0.01 --out DIR`")
  with open(path) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"library={library_dir!r}: {LIBRARY_FILE} is not valid JSON ({e})") from None
  if meta.get("format") != LIBRARY_FORMAT:
    raise ValueError(f"library={library_dir!r}: format={meta.get('format')!r}; allowed: "
                     f"{LIBRARY_FORMAT!r}")
  return meta


def library_ratios(meta: dict) -> tuple[float, ...]:
  """The keep ratios available in a library (sorted, including the dense 1.0)."""
  return tuple(sorted(float(e["keep"]) for e in meta["entries"].values()))


def find_entry(meta: dict, keep: float, library_dir: str = "") -> dict:
  """The entry of ``keep``; ValueError naming the ratio and the available ones if missing."""
  entry = meta["entries"].get(ratio_key(keep))
  if entry is None:
    raise ValueError(f"keep ratio {keep!r} is not in the library {library_dir!r}; available: "
                     f"{list(library_ratios(meta))}")
  return entry


def load_entry(library_dir: str, keep: float, template, meta: dict | None = None):
  """Restores the pruned variables of ratio ``keep``.

  Args:
    library_dir: a directory written by :func:`build_library`.
    keep: one of its keep ratios.
    template: variables (or their ``ShapeDtypeStruct`` tree) of the same model.
    meta: the parsed ``library.json`` (read if None).

  Returns:
    The variables (numpy arrays), same tree as ``template``.
  """
  meta = meta or read_library(library_dir)
  entry = find_entry(meta, keep, library_dir)
  path = _abs(os.path.join(library_dir, entry["checkpoint"]))
  if not os.path.isdir(path):
    raise ValueError(f"library={library_dir!r}: checkpoint {entry['checkpoint']!r} of keep "
                     f"ratio {keep!r} is missing; rebuild it with `nemo-jax prune-library`")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                          if not isinstance(x, jax.ShapeDtypeStruct) else x, dict(template))
  try:
    restored = _checkpointer().restore(path, abstract)
  except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged files
    raise ValueError(f"library={library_dir!r}: checkpoint {entry['checkpoint']!r} of keep "
                     f"ratio {keep!r} cannot be restored ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200]}); rebuild it with `nemo-jax "
                     "prune-library`") from None
  restored = jax.tree.map(np.asarray, restored)
  check_finite(restored, f"library={library_dir!r} entry keep={keep!r}")
  return restored


def library_table(meta: dict) -> str:
  """Text table of a library: keep ratio, non-zero weights and accuracy per entry."""
  s = meta["settings"]
  lines = [f"library of {s['model']} on {s['dataset']} ({s['schedule']}, {s['steps']} steps; "
           f"top-1 on {s['eval_split']})",
           f"{'keep':>7} {'nonzero':>10} {'weights':>10} {'top1':>7} {'seconds':>8}"]
  for key in sorted(meta["entries"], key=float):
    e = meta["entries"][key]
    lines.append(f"{e['keep']:>7.4f} {e['nonzero']:>10d} {e['weights']:>10d} "
                 f"{100 * e['top1']:>6.2f}% {e['seconds']:>8.1f}")
  return "\n".join(lines)
