"""Test-session setup: CPU only, and one persistent XLA compilation cache per session.

The cache is shared by the in-process tests and the CLI subprocesses they start (through
the environment), so each distinct program compiles once per session.
"""

import atexit
import os
import shutil
import tempfile


def _session_dir(variable, prefix):
  """The directory named by ``variable``, or a new temporary one removed at exit.

  Only the process that creates the directory removes it: pytest-xdist workers inherit
  the variable from the controller, which outlives them.
  """
  if variable not in os.environ:
    os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, os.environ[variable], ignore_errors=True)
  return os.environ[variable]


os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = _session_dir("JAX_COMPILATION_CACHE_DIR", "nemo_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Calibration (and other) caches of this session stay out of the user's ~/.cache.
_session_dir("NEMO_JAX_CACHE_DIR", "nemo_jax_cache_")

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "configs", "smoke.py")


def write_run_dir(out, objectives=("model_ratio", "bops_ratio"), final_split=None,
                  lowest=False, **overrides):
  """A run directory as ``nemo-jax search`` writes it (config.json, front.json) from the
  smoke config, with a uniform W8A8, a pruned mixed-precision and a uniform W4A4 member
  (``lowest``: and a uniform member at the lowest bit-width, W2A2): the front entries
  are the run module's own records of those configurations (no search needed).

  Returns:
    ``(out, problem, front)``.
  """
  import jax.numpy as jnp
  import numpy as np
  from nemo_jax._src.faults import write_json
  from nemo_jax._src.run import final as final_lib
  from nemo_jax._src.run.config import load_search_config
  from nemo_jax._src.run.rundir import CONFIG_FILE, FRONT_FILE
  from nemo_jax._src.run.search import build_problem

  cfg = load_search_config(SMOKE, objectives=list(objectives), keep_choices=[0.6, 1.0],
                           final_split=final_split, **overrides)
  problem = build_problem(cfg, progress=False)
  num_choices = len(cfg.bit_choices)
  active = len(problem.space.active_nodes)
  mixed = np.random.default_rng(0).integers(0, num_choices, active)
  rows = [np.full(active, cfg.bit_choices.index(8)), mixed,
          np.full(active, cfg.bit_choices.index(4))]
  keeps = [1, 0, 1]
  if lowest:
    rows.append(np.full(active, int(np.argmin(cfg.bit_choices))))
    keeps.append(1)
  choice = np.stack(rows).astype(np.int32)
  keep_idx = np.asarray(keeps, np.int32)
  _, _, raw = problem.objectives(problem.decode(jnp.asarray(choice), jnp.asarray(keep_idx)))
  raw = final_lib.raw_matrix(raw, problem.raw_names)
  front = final_lib.members(problem, choice, keep_idx, None, None, raw, None)
  write_json(os.path.join(out, CONFIG_FILE), {"config": cfg.to_dict(), "seed": cfg.seed})
  write_json(os.path.join(out, FRONT_FILE), front)
  return out, problem, front


@pytest.fixture(scope="session")
def make_run_dir():
  """:func:`write_run_dir` for tests (``make_run_dir(out, **options)``)."""
  return write_run_dir


@pytest.fixture(scope="module")
def smoke_problem():
  """The problem of the smoke config (experiments/configs/smoke.py), built once per file."""
  import nemo_jax
  return nemo_jax.build_problem(SMOKE, progress=False)
