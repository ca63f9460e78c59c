"""A run directory: the one reader and writer of its files.

``nemo-jax search --out DIR`` writes (``docs/DESIGN.md``, "Data flow"):

* ``config.json``: ``{"config": <sectioned config>, "seed", "versions", "timing",
  "final_hypervolume"}``;
* ``front.json`` / ``uniform.json``: the front members and the uniform baselines
  (:class:`FrontMember` each);
* ``history.csv``: one row per generation;
* ``checkpoints/`` (orbax, one step per generation) and ``damaged_checkpoints/``;
* pictures (``front.png``, ``species.png``; ``report.py``);
* ``.lock`` while a writer (search, resume, fine-tuning, an export or report into the
  run) owns it (:meth:`RunDir.lock`; ``docs/DESIGN.md``, "Faults").

Every other module (export, fine-tuning, the EMOMC report, ``nemo-jax report``) reads a
run through :class:`RunDir`, so a missing or unreadable file is one error naming the
directory and the file, and the front members come back typed.
"""

from __future__ import annotations

import collections.abc
import csv
import dataclasses
import json
import os
import shutil
from typing import Any, Iterator, Mapping, Sequence

from nemo_jax._src.emomc.io import LIBRARY_FILE
from nemo_jax._src.faults import DirLock, write_json
from nemo_jax._src.registries import Registries
from nemo_jax._src.run.config import SearchConfig, load_search_config

CONFIG_FILE = "config.json"
FRONT_FILE = "front.json"
UNIFORM_FILE = "uniform.json"
HISTORY_FILE = "history.csv"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"


@dataclasses.dataclass(frozen=True)
class FrontMember(collections.abc.Mapping):
  """One configuration of a run's results (an entry of ``front.json`` / ``uniform.json``).

  Read as attributes (``m.w_bits``) or, like the JSON entry, as a mapping (``m["w_bits"]``).

  Attributes:
    w_bits, a_bits: per weight / activation quantizer bit-widths (32: float).
    keep: the keep ratio.
    species: the species label that found it (``"uniform"`` for the baselines).
    generation: the generation it was found in.
    objectives: the searched objectives (normalised, minimised).
    metrics: every raw quantity in its own unit.
    bits: the bit-width of a uniform baseline (W = A), else None.
    selection_top1, final_top1: top-1 on the selection images / the test split, when
      measured (``docs/DESIGN.md``, "Image sets").
  """
  w_bits: tuple[int, ...]
  a_bits: tuple[int, ...]
  keep: float
  species: str
  generation: int
  objectives: Mapping[str, float]
  metrics: Mapping[str, float]
  bits: int | None = None
  selection_top1: float | None = None
  final_top1: float | None = None

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], where: str = "member") -> "FrontMember":
    """Parses a JSON entry.

    Raises:
      ValueError naming ``where`` and the missing or malformed field.
    """
    if not isinstance(d, Mapping):
      raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
      raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {names}")
    try:
      return cls(w_bits=tuple(int(b) for b in d["w_bits"]),
                 a_bits=tuple(int(b) for b in d["a_bits"]), keep=float(d["keep"]),
                 species=str(d["species"]), generation=int(d["generation"]),
                 objectives={str(k): float(x) for k, x in d["objectives"].items()},
                 metrics={str(k): float(x) for k, x in d["metrics"].items()},
                 bits=None if d.get("bits") is None else int(d["bits"]),
                 selection_top1=_optional_float(d.get("selection_top1")),
                 final_top1=_optional_float(d.get("final_top1")))
    except KeyError as e:
      raise ValueError(f"{where}: field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError, AttributeError) as e:
      raise ValueError(f"{where}: malformed ({type(e).__name__}: {e})") from None

  def to_dict(self) -> dict:
    """The JSON entry (optional fields only when set), in the order runs write them."""
    out = {"w_bits": list(self.w_bits), "a_bits": list(self.a_bits), "keep": self.keep,
           "species": self.species, "generation": self.generation,
           "objectives": dict(self.objectives), "metrics": dict(self.metrics)}
    for k in ("bits", "selection_top1", "final_top1"):
      if getattr(self, k) is not None:
        out[k] = getattr(self, k)
    return out

  def __getitem__(self, key):
    value = getattr(self, key) if key in self._keys() else None
    if value is None:
      raise KeyError(key)
    return list(value) if key in ("w_bits", "a_bits") else value

  def __iter__(self) -> Iterator[str]:
    return iter(self.to_dict())

  def __len__(self) -> int:
    return len(self.to_dict())

  @classmethod
  def _keys(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _optional_float(x):
  return None if x is None else float(x)


def read_history_csv(path: str) -> list[dict]:
  """The rows of a ``history.csv`` (numbers parsed)."""
  with open(path) as f:
    return [{k: _num(x) for k, x in r.items()} for r in csv.DictReader(f)]


def write_history_csv(path: str, rows: Sequence[dict]) -> None:
  """One row per generation (keys of the first row are the columns), atomically."""
  if not rows:
    return
  cols = list(rows[0].keys())
  tmp = f"{path}.tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    for r in rows:
      w.writerow(r)
  os.replace(tmp, path)


def _num(x):
  try:
    f = float(x)
    return int(f) if f.is_integer() and "." not in x and "e" not in x.lower() else f
  except (TypeError, ValueError):
    return x


class RunDir:
  """Reads and writes one run directory (module docstring).

  Args:
    path: the directory.
  """

  def __init__(self, path: str):
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
      raise ValueError(f"run directory {path!r} is invalid; allowed: a directory path")
    self.path = os.fspath(path)

  def __repr__(self) -> str:
    return f"RunDir({self.path!r})"

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  @property
  def checkpoints(self) -> str:
    return self.file(CHECKPOINT_DIR)

  @property
  def damaged(self) -> str:
    return self.file(DAMAGED_DIR)

  def previous_run(self) -> list[str]:
    """The files of a run already there (config, checkpoints, front), if any."""
    return [f for f in (CONFIG_FILE, CHECKPOINT_DIR, FRONT_FILE) if os.path.exists(self.file(f))]

  def require(self, *names: str, what: str = "a finished `nemo-jax search` output "
              "directory") -> None:
    """Raises ValueError naming the directory and the first missing file."""
    if not os.path.isdir(self.path):
      raise ValueError(f"run_dir={self.path!r}: no such directory; allowed: {what}")
    for n in names:
      if not os.path.exists(self.file(n)):
        raise ValueError(f"run_dir={self.path!r}: {n} is missing; allowed: {what}")

  # ------------------------------------------------------------------ reading
  def read_json(self, name: str):
    """A JSON file of the run; ValueError naming it when missing or unreadable."""
    self.require(name)
    try:
      with open(self.file(name)) as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"run_dir={self.path!r}: {name} is unreadable ({type(e).__name__}: "
                       f"{e}); allowed: the file `nemo-jax search` wrote") from None

  def saved_config(self) -> Mapping[str, Any]:
    """The saved config mapping (``config.json``'s ``config``)."""
    data = self.read_json(CONFIG_FILE)
    if not isinstance(data, Mapping) or not isinstance(data.get("config"), Mapping):
      raise ValueError(f"run_dir={self.path!r}: {CONFIG_FILE} holds no run config; allowed: "
                       "the config.json written by nemo-jax search")
    return data["config"]

  def read_config(self, registries: Registries | None = None, **overrides) -> SearchConfig:
    """The run's validated config (a flat one from an earlier version loads too)."""
    saved = self.saved_config()
    try:
      return load_search_config(saved, registries, **overrides)
    except ValueError as e:
      raise ValueError(f"run_dir={self.path!r}: {CONFIG_FILE}: {e}") from None

  def read_members(self, name: str = FRONT_FILE) -> list[FrontMember]:
    """The typed entries of ``front.json`` (or ``uniform.json``)."""
    data = self.read_json(name)
    if not isinstance(data, list):
      raise ValueError(f"run_dir={self.path!r}: {name} is not a list of members")
    return [FrontMember.from_dict(m, f"{self.file(name)}[{i}]") for i, m in enumerate(data)]

  def read_front(self) -> list[FrontMember]:
    return self.read_members(FRONT_FILE)

  def read_uniform(self) -> list[FrontMember] | None:
    """``uniform.json``'s members, or None when the run has none."""
    return self.read_members(UNIFORM_FILE) if os.path.exists(self.file(UNIFORM_FILE)) else None

  def read_history(self) -> list[dict]:
    self.require(HISTORY_FILE)
    try:
      return read_history_csv(self.file(HISTORY_FILE))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
      raise ValueError(f"run_dir={self.path!r}: {HISTORY_FILE} is unreadable ({e})") from None

  # ------------------------------------------------------------------ writing
  def write_config(self, cfg: SearchConfig, **entries) -> None:
    """Writes ``config.json`` (the sectioned config plus ``entries``)."""
    write_json(self.file(CONFIG_FILE), {"config": cfg.to_dict(), **entries})

  def record(self, **entries) -> None:
    """Adds top-level entries to ``config.json`` (``timing``, ``final_hypervolume``)."""
    try:
      with open(self.file(CONFIG_FILE)) as f:
        saved = json.load(f)
    except (OSError, json.JSONDecodeError):
      return
    saved.update(entries)
    write_json(self.file(CONFIG_FILE), saved)

  def write_members(self, name: str, members: Sequence[Mapping]) -> None:
    write_json(self.file(name), [dict(m.to_dict() if isinstance(m, FrontMember) else m)
                                 for m in members])

  def write_history(self, rows: Sequence[dict]) -> None:
    write_history_csv(self.file(HISTORY_FILE), rows)

  def lock(self, command: str, what: str = "out_dir", create: bool = True) -> DirLock:
    """The directory's exclusive lock (``with run.lock("nemo-jax search"): ...``).

    A second writer gets a ``faults.LockedError`` naming the owner (pid, host, command,
    since when); a lock left by a process that is gone is taken over. With ``create``
    a missing directory is created (and removed again if still empty at release).
    """
    return DirLock(self.path, command, what, create)

  def claim(self, overwrite: bool) -> None:
    """A new run never writes over a previous run's results unless asked to.

    Raises:
      ValueError: the directory holds a run and ``overwrite`` is False, or it holds an
        EMOMC library (never replaced).
    """
    if os.path.exists(self.file(LIBRARY_FILE)):
      raise ValueError(f"out_dir={self.path!r} holds an EMOMC library ({LIBRARY_FILE}); "
                       "allowed: another directory (a search names its library with "
                       "library=DIR and writes its run elsewhere)")
    previous = self.previous_run()
    if not previous:
      return
    if not overwrite:
      raise ValueError(f"out_dir={self.path!r} already holds a run ({', '.join(previous)}); "
                       "allowed: resume it (--resume DIR / resume=True), another directory, "
                       "or --overwrite / overwrite=True to replace it")
    for d in (CHECKPOINT_DIR, DAMAGED_DIR):
      shutil.rmtree(self.file(d), ignore_errors=True)
