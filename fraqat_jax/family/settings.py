"""Typed config keys: a key is a field of a frozen dataclass, with its default, help and check.

A *settings class* is a frozen dataclass whose every field is made by :func:`setting`. The trainer's
own keys are one such class (``fraqat_jax.recipe.config``); each family declares its own keys as
another (:attr:`fraqat_jax.family.Family.Config`), so a run carries the keys of its family only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping


class ConfigError(ValueError):
    """A bad config file, key or value (the message names it and what is allowed); the command
    lines print it on one line and exit 2."""


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: ``name``, ``default`` (its type is the key's type), ``help`` (shown by
    ``--help``) and ``check(value) -> None`` raising :class:`ConfigError` naming a bad value."""

    name: str
    default: Any
    help: str
    check: Callable[[Any], None] | None = None

    @property
    def type(self) -> type:
        return type(self.default)


def setting(default: Any, help: str, check: Callable[[Any], None] | None = None):  # noqa: A002
    """A dataclass field declaring one config key (see :class:`Key`)."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


def keys_of(settings_class: type | None) -> dict[str, Key]:
    """``{name: Key}`` of a settings class, in declaration order (``{}`` for None)."""
    if settings_class is None:
        return {}
    return {f.name: Key(f.name, f.default, f.metadata.get("help", ""), f.metadata.get("check"))
            for f in dataclasses.fields(settings_class)}


# ------------------------------------------------------------------ checks (each names the bad value)


def one_of(*allowed: str) -> Callable[[Any], None]:
    """A check: the value is one of ``allowed``."""
    def check(value, key: str = "value"):
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(allowed)}")
    check.allowed = allowed
    return check


def int_at_least(low: int) -> Callable[[Any], None]:
    """A check: an integer (not a bool) >= ``low``."""
    def check(value, key: str = "value"):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise ConfigError(f"{key}={value!r} is not allowed: use {what}")
    return check


def number_in(low: float, high: float, *, high_open: bool = False, what: str = "a number") -> Callable[[Any], None]:
    """A check: a number in ``[low, high]`` (``[low, high)`` with ``high_open``)."""
    def check(value, key: str = "value"):
        ok = low <= float(value) < high if high_open else low <= float(value) <= high
        if not ok:
            raise ConfigError(f"{key}={value!r} is not allowed: use {what} in [{low:g}, {high:g}{')' if high_open else ']'}")
    return check


def run_checks(keys: Mapping[str, Key], values: Mapping[str, Any]) -> None:
    """Runs each key's check on its value (the first bad one raises)."""
    for name, key in keys.items():
        if key.check is not None and name in values:
            key.check(values[name], key=name)


def parse_text(key: Key, text: str) -> Any:
    """``--set KEY=TEXT`` -> a value of the key's type (:class:`ConfigError` naming it if it is not)."""
    default = key.default
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key.name}={text!r} is not allowed: use true or false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key.name}={text!r} is not allowed: use an integer") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key.name}={text!r} is not allowed: use a number") from None
    return text


def coerce(key: Key, value: Any, where: str) -> Any:
    """A value from a config file or mapping, as the key's type (an int is taken for a float)."""
    if isinstance(key.default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(key.default):
        raise ConfigError(f"{key.name}={value!r} in {where} has type {type(value).__name__}; expected "
                          f"{type(key.default).__name__}")
    return value


def merged(*groups: Iterable[Key]) -> dict[str, Key]:
    """The keys of several settings classes in order (a name declared twice must agree on its default)."""
    out: dict[str, Key] = {}
    for group in groups:
        for key in group:
            if key.name in out and out[key.name].default != key.default:
                raise ValueError(f"config key {key.name!r} is declared twice with defaults "
                                 f"{out[key.name].default!r} and {key.default!r}")
            out.setdefault(key.name, key)
    return out
