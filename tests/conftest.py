"""Shared pytest set-up: run JAX on the CPU in float32 with deterministic settings."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
