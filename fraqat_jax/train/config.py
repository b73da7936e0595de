"""The run's config keys and their checks, which live in the run recipe (:mod:`fraqat_jax.recipe.config`);
re-exported here."""

from fraqat_jax.recipe.config import (HELP, RENAMED, ConfigError, get_config, help_for, keys_for, load_config,
                                      upgrade_saved, validate)

__all__ = ["ConfigError", "HELP", "RENAMED", "get_config", "help_for", "keys_for", "load_config", "upgrade_saved",
           "validate"]
