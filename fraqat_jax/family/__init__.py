"""family/: the model-family interface, the seam between the commands and a kind of model.

A *family* is one object per model (its constants are attributes) that answers every question
whose answer depends on what the model is. The commands (train, eval, export, plan, compare,
generate) ask it through the protocols of :mod:`fraqat_jax.family.protocols`: :class:`Training`
(inputs, apply, loss), :class:`Teachers` (where the teacher comes from), :class:`Data` (data
sources and the family's own config keys, :attr:`Family.Config`), :class:`Evaluation`,
:class:`Export` (graph inputs, the components of a phone pipeline) and :class:`Generation`
(sample files, text and images from a trained model). :class:`Family` is their sum with defaults.

Registration: a package declares its families as entry points of the group
``fraqat_jax.families`` (each names a :class:`Family` instance, or a sequence of them); they are
loaded on the first lookup. :func:`register` adds one from code (a test's toy family).

Lookup: :func:`family_for_teacher` (a ``teacher=`` value), :func:`family_for_model` (a model, its
class or class name), :func:`family_named` (a family's :attr:`~Family.name`), :func:`families`.

This part imports nothing of the package but ``nn/`` (the default quantization rules, at call
time), and names no implementation: every part may import it.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from fraqat_jax.family.protocols import (CapabilityError, Data, Evaluation, Export, Family, Generation,
                                         PipelineComponents, Teachers, Training)
from fraqat_jax.family.settings import ConfigError, Key, keys_of, setting

__all__ = ["ENTRY_POINT_GROUP", "CapabilityError", "ConfigError", "Data", "Evaluation", "Export", "Family",
           "FamilyError", "Generation", "Key", "PipelineComponents", "Teachers", "Training", "families",
           "family_for_model", "family_for_teacher", "family_named", "keys_of", "register", "setting", "unregister"]

#: The packaging entry-point group whose entries are families.
ENTRY_POINT_GROUP = "fraqat_jax.families"


class FamilyError(ConfigError):
    """No registered family takes this model or teacher (the message names it and lists the supported)."""


_REGISTRY: dict[str, Family] = {}
_loaded = False


def register(family: Family) -> Family:
    """Adds ``family`` (replacing one of the same name); its model classes must not belong to another."""
    if not isinstance(family, Family):
        raise TypeError(f"{family!r} is not a fraqat_jax.family.Family instance")
    if not family.name or not family.model_classes:
        raise ValueError(f"family {family!r} needs a name and model_classes")
    for other in _REGISTRY.values():
        clash = set(other.model_classes) & set(family.model_classes)
        if clash and other.name != family.name:
            raise ValueError(f"model classes {sorted(clash)} already belong to family {other.name!r}")
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    """Removes the family called ``name`` (a test's toy family, when the test ends)."""
    _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        value = ep.load()
        for family in (value if isinstance(value, (list, tuple)) else [value]):
            if family.name not in _REGISTRY:
                register(family)


def families() -> dict[str, Family]:
    """Every registered family by name."""
    _load_entry_points()
    return dict(_REGISTRY)


def _supported() -> str:
    return (", ".join(c for f in families().values() for c in f.model_classes)
            or f"none: no family is registered (install the package so that its {ENTRY_POINT_GROUP!r} entry points exist)")


def family_named(name: str) -> Family:
    """The family called ``name`` (:class:`FamilyError` listing the registered ones)."""
    found = families().get(name)
    if found is None:
        raise FamilyError(f"family {name!r} is not registered; registered: {', '.join(families()) or 'none'}")
    return found


def family_for_model(model) -> Family:
    """The family of a model instance, a model class or a class name (:class:`FamilyError` if none)."""
    name = model if isinstance(model, str) else (model.__name__ if isinstance(model, type) else type(model).__name__)
    for family in families().values():
        if name in family.model_classes:
            return family
    raise FamilyError(f"teacher class {name!r} is not supported; supported: {_supported()}")


def family_for_teacher(teacher: str) -> Family:
    """The family whose models ``teacher`` (a ``teacher=`` config value) names (:class:`FamilyError`
    naming the class it found and the supported ones when none does)."""
    seen = []
    for family in families().values():
        cls = family.teacher_class(teacher)
        if cls is None:
            continue
        if cls in family.model_classes:
            return family
        seen.append(cls)
    for cls in seen:  # read by one family's reader, driven by another
        for family in families().values():
            if cls in family.model_classes:
                return family
    what = f"a {seen[0]}" if seen else "not a model folder, file, preset or built-in name any family reads"
    raise FamilyError(f"teacher={teacher!r} is {what}, which is not supported as a teacher; supported: {_supported()}")
