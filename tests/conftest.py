"""Test-session setup: CPU only, and one persistent XLA compilation cache per session.

The cache is shared by the in-process tests and the CLI subprocesses they start (through
the environment), so each distinct program compiles once per session.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               tempfile.mkdtemp(prefix="nemo_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Calibration (and other) caches of this session stay out of the user's ~/.cache.
os.environ.setdefault("NEMO_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="nemo_jax_cache_"))

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
