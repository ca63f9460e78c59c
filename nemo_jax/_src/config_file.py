"""The one config-file loader: ``.py`` files with ``get_config()`` or ``.json`` files.

Every configuration of the package (search, float training, EMOMC library, precision
JSON) is read by :func:`load_config_file`. Python files follow big_vision's convention:
``FILE.py`` calls ``get_config()``, ``FILE.py:ARG`` calls ``get_config(ARG)`` (variants
of one experiment, e.g. ``paper_imagenet.py:resnet50`` or ``emomc_default.py:size``).
The loader knows nothing about what the file configures; the caller validates.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import traceback
from typing import Any, Mapping


def split_variant(path: str) -> tuple[str, str | None]:
  """``"FILE.py:ARG"`` -> ``("FILE.py", "ARG")``; other paths -> ``(path, None)``."""
  if ".py:" in path:
    file, arg = path.rsplit(":", 1)
    return file, arg
  return path, None


def user_code_error(path: str, e: BaseException, doing: str = "") -> ValueError:
  """A ValueError naming the user's file, the line in it and what went wrong.

  Args:
    path: the user's file (a config, a plugin, a model factory).
    e: the exception its code raised (a SyntaxError while compiling it).
    doing: what was being done, e.g. ``"get_config('foo')"``.
  """
  if isinstance(e, SyntaxError):
    where = f"{path}:{e.lineno}" if e.lineno else path
    return ValueError(f"{where}: syntax error ({e.msg}); allowed: a Python file that "
                      "compiles")
  line = None
  target = os.path.abspath(path)
  for frame in traceback.extract_tb(e.__traceback__):
    if os.path.abspath(frame.filename) == target:
      line = frame.lineno
  where = f"{path}:{line}" if line else path
  text = str(e).splitlines()[0] if str(e) else ""
  return ValueError(f"{where}: {doing + ' ' if doing else ''}raised {type(e).__name__}"
                    + (f": {text}" if text else "") + " (an error in that file)")


def load_python_file(path: str, module_name: str = "_nemo_jax_user_config"):
  """Executes a python file as a module (configs, user plugins); returns the module.

  Raises:
    ValueError: a missing file, or one that does not compile or raises while it is
      executed (naming the file and line).
  """
  if not os.path.exists(path):
    raise ValueError(f"config file {path!r} does not exist")
  if os.path.isdir(path):
    raise ValueError(f"{path!r} is a directory; allowed: a .py file")
  spec = importlib.util.spec_from_file_location(module_name, path)
  if spec is None or spec.loader is None:
    raise ValueError(f"{path!r}: cannot be loaded as a Python file; allowed: a .py file")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - any error in the user's file is theirs
    raise user_code_error(path, e, "importing it") from None
  return module


def _call_get(path: str, get, function: str, arg: str | None):
  """``get()`` / ``get(arg)`` of a config file, its errors naming the file."""
  try:
    inspect.signature(get).bind(*(() if arg is None else (arg,)))
  except TypeError:
    if arg is None:
      raise ValueError(f"config file {path}: {function}() needs a variant; allowed: "
                       f"{path}:VARIANT") from None
    raise ValueError(f"config file {path}: {function}() takes no variant, but "
                     f"{path}:{arg} names one; allowed: {path} without ':{arg}'") from None
  except ValueError:  # no signature (a builtin): just call it
    pass
  call = f"{function}()" if arg is None else f"{function}({arg!r})"
  try:
    return get() if arg is None else get(arg)
  except ValueError as e:
    raise ValueError(f"config file {path}: {call}: {e}") from None
  except Exception as e:  # noqa: BLE001 - any error in the user's file is theirs
    raise user_code_error(path, e, call) from None


def load_config_file(path: str | os.PathLike, function: str = "get_config") -> Mapping[str, Any]:
  """Reads a ``.json`` config or calls ``function([ARG])`` of a ``.py`` one.

  Args:
    path: ``FILE.json``, ``FILE.py`` or ``FILE.py:ARG``.
    function: the function a ``.py`` file must define (``get_config``; the EMOMC
      library stage uses ``get_library_config``).

  Returns:
    The mapping the file defines (not validated).

  Raises:
    ValueError: missing file, invalid JSON, a ``.py`` without ``function``, another
      extension, or a variant the function rejects.
  """
  path, arg = split_variant(os.fspath(path))
  if not os.path.exists(path):
    raise ValueError(f"config file {path!r} does not exist")
  if path.endswith(".json"):
    if arg is not None:
      raise ValueError(f"config file {path}: variants (FILE:ARG) need a .py file")
    if os.path.isdir(path):
      raise ValueError(f"config file {path!r} is a directory; allowed: a .json file")
    try:
      with open(path) as f:
        out = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      raise ValueError(f"config file {path}: not valid JSON ({e})") from None
    if not isinstance(out, Mapping):
      hint = (" (a front.json is a list of members: `nemo-jax export RUN_DIR --member K` "
              "writes member K's precision config, FILE.json)" if isinstance(out, list)
              else "")
      raise ValueError(f"config file {path}: the top level is a JSON "
                       f"{'array' if isinstance(out, list) else type(out).__name__}; "
                       "allowed: a JSON object {\"field\": value, ...}" + hint)
    return out
  if path.endswith(".py"):
    module = load_python_file(path)
    if not hasattr(module, function):
      raise ValueError(f"config file {path}: defines no {function}()")
    get = getattr(module, function)
    if not callable(get):
      raise ValueError(f"config file {path}: {function} is a {type(get).__name__}; allowed: "
                       "a function returning a dict")
    out = _call_get(path, get, function, arg)
    if not isinstance(out, Mapping):
      raise ValueError(f"config file {path}: {function}() returned "
                       f"{type(out).__name__}; allowed: a dict")
    return out
  raise ValueError(f"config file {path}: expected a .py (with {function}()) or .json file")


def resolve_object(spec: str, field: str):
  """Imports ``"package.module:attr"`` or ``"path/to/file.py:attr"`` and returns ``attr``.

  Used for user plugins named in config files (custom costs, species, models), so a
  run started from the CLI or resumed later finds them again.
  """
  if not isinstance(spec, str) or ":" not in spec:
    raise ValueError(f"{field}={spec!r} is invalid; allowed: 'package.module:name' or "
                     "'path/to/file.py:name'")
  target, attr = spec.rsplit(":", 1)
  if target.endswith(".py"):
    if not os.path.isfile(target):
      raise ValueError(f"{field}={spec!r}: no such file {target!r}; allowed: "
                       "'package.module:name' or an existing 'path/to/file.py:name'")
    try:
      module = load_python_file(target, module_name="_nemo_jax_plugin_"
                                + os.path.splitext(os.path.basename(target))[0])
    except ValueError as e:
      raise ValueError(f"{field}={spec!r}: {e}") from None
  else:
    try:
      module = importlib.import_module(target)
    except ImportError as e:
      raise ValueError(f"{field}={spec!r}: cannot import {target!r} ({e})") from None
    except Exception as e:  # noqa: BLE001 - an error in the user's module
      where = getattr(e, "filename", None) if isinstance(e, SyntaxError) else None
      raise ValueError(f"{field}={spec!r}: importing {target!r} raised {type(e).__name__}: "
                       f"{e}" + (f" ({where})" if where else "")) from None
  if not hasattr(module, attr):
    raise ValueError(f"{field}={spec!r}: {target!r} defines no {attr!r}")
  return getattr(module, attr)


def parse_variant(arg: str | None, choices: Mapping[str, tuple[str, ...]],
                  defaults: Mapping[str, Any], keys: tuple[str, ...] = ()) -> dict:
  """Parses a config variant ``"size,nemo,library=runs/lib"`` (the ARG of ``FILE.py:ARG``).

  Each comma-separated token is either a value of one of ``choices`` (its group is
  found by the value) or ``key=value`` for a group or one of ``keys`` (free strings,
  e.g. paths).

  Args:
    arg: the variant string (None or "": the defaults).
    choices: ``{group: allowed values}``.
    defaults: a value per group (and optional defaults for ``keys``).
    keys: names that take free ``key=value`` strings.

  Returns:
    ``{group or key: value}`` with every group present.

  Raises:
    ValueError naming the token and everything allowed.
  """
  out = dict(defaults)
  allowed = ([v for vals in choices.values() for v in vals]
             + [f"{g}=..." for g in choices] + [f"{k}=..." for k in keys])
  for token in (t.strip() for t in (arg or "").split(",")):
    if not token:
      continue
    if "=" in token:
      k, value = token.split("=", 1)
      if k in choices and value in choices[k]:
        out[k] = value
        continue
      if k in keys:
        out[k] = value
        continue
    else:
      group = next((g for g, vals in choices.items() if token in vals), None)
      if group is not None:
        out[group] = token
        continue
    raise ValueError(f"config variant token {token!r} is invalid; allowed: {allowed}")
  return out
