"""Shared pytest set-up: JAX on the CPU, and one persistent compilation cache for the whole suite.

Many tests compile the same tiny models and train steps, in several processes (xdist workers and
the subprocesses of CLI tests, which inherit these variables). JAX's persistent cache keys an
executable by its program, options and JAX version, so a hit returns what compiling would.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"fraqat_jax_test_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
