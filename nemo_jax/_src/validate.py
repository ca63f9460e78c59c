"""Field validators shared by every configuration (search, train, library, precision JSON).

Each validator checks one value and returns it normalised (``tuple`` for lists, ``int``
for integers, ...) or raises ``ValueError`` with one message style everywhere:
``"{field}={value!r} is invalid; allowed: {allowed}"``. Configurations are validated
once, at their entry point (API, CLI, files), never again inside the jitted pipeline
(``docs/DESIGN.md``, "Contracts").
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping, Sequence


def fail(field: str, value: Any, allowed: Any) -> None:
  """Raises the one ValueError style of the package."""
  raise ValueError(f"{field}={value!r} is invalid; allowed: {allowed}")


def is_integer(v: Any) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


INT32_MAX = 2**31 - 1
"""The largest integer a config field may hold unless it says otherwise: counts, sizes and
seeds reach the engine as int32 (a larger value would overflow there)."""


def integer(field: str, v: Any, minimum: int | None = None, maximum: int | None = None) -> int:
  """An integer in ``[minimum, maximum]`` (``maximum`` defaults to :data:`INT32_MAX`)."""
  if maximum is None and is_integer(v) and v > INT32_MAX:
    fail(field, v, (f"an integer >= {minimum} and " if minimum is not None else "an integer ")
         + f"<= {INT32_MAX} (int32)")
  if not is_integer(v) or (minimum is not None and v < minimum) or (
      maximum is not None and v > maximum):
    if minimum is not None and maximum is not None:
      allowed = f"an integer in {minimum}..{maximum}"
    elif minimum is not None:
      allowed = f"an integer >= {minimum}"
    else:
      allowed = "an integer"
    fail(field, v, allowed)
  return int(v)


def seed(field: str, v: Any) -> int:
  """A PRNG seed: an integer in ``0..2**31 - 1``."""
  return integer(field, v, 0, INT32_MAX)


def optional_integer(field: str, v: Any, minimum: int | None = None) -> int | None:
  return None if v is None else integer(field, v, minimum)


def number(field: str, v: Any, lo: float | None = None, hi: float | None = None,
           open_lo: bool = False) -> float:
  """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
  ok = is_number(v) and math.isfinite(float(v))
  if ok and lo is not None:
    ok = float(v) > lo if open_lo else float(v) >= lo
  if ok and hi is not None:
    ok = float(v) <= hi
  if not ok:
    parts = []
    if lo is not None:
      parts.append(f"{'>' if open_lo else '>='} {lo}")
    if hi is not None:
      parts.append(f"<= {hi}")
    fail(field, v, "a finite number" + (" " + " and ".join(parts) if parts else ""))
  return float(v)


def boolean(field: str, v: Any) -> bool:
  if not isinstance(v, bool):
    fail(field, v, (True, False))
  return v


def choice(field: str, v: Any, allowed: Sequence[Any]) -> Any:
  """One of ``allowed``."""
  if v not in tuple(allowed):
    fail(field, v, tuple(allowed))
  return v


def nonempty_string(field: str, v: Any, what: str = "a non-empty string") -> str:
  if not isinstance(v, str) or not v:
    fail(field, v, what)
  return v


def sequence(field: str, v: Any, what: str = "a list") -> tuple:
  """A list or tuple (not a string) as a tuple."""
  if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
    fail(field, v, what)
  return tuple(v)


def input_shape(field: str, v: Any) -> tuple[int, int, int]:
  """``(H, W, C)`` of positive integers."""
  if (isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or len(v) != 3
      or not all(is_integer(s) and s > 0 for s in v)):
    fail(field, v, "[H, W, C] positive integers")
  return tuple(int(s) for s in v)


def keep_ratio(field: str, v: Any) -> float:
  """A keep ratio (fraction of weights KEPT) in ``(0, 1]``."""
  return number(field, v, 0.0, 1.0, open_lo=True)


def increasing(field: str, values: Sequence[Any], what: str) -> tuple:
  """Strictly increasing values."""
  values = tuple(values)
  if list(values) != sorted(set(values)):
    fail(field, list(values), f"strictly increasing {what}")
  return values


def known_keys(what: str, d: Mapping[str, Any], allowed: Iterable[str]) -> None:
  """Rejects keys of ``d`` outside ``allowed`` (names every unknown key)."""
  if not isinstance(d, Mapping):
    raise ValueError(f"{what}: expected a mapping, got {type(d).__name__}")
  allowed = set(allowed)
  unknown = sorted(set(d) - allowed)
  if unknown:
    raise ValueError(f"{what}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def dataclass_from(cls, what: str, d: Mapping[str, Any]):
  """``cls(**d)`` for a dataclass after rejecting unknown keys."""
  import dataclasses
  known_keys(what, d, (f.name for f in dataclasses.fields(cls)))
  return cls(**d)
