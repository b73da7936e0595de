"""The layout's rules, read from the source with ``ast`` (imports at any level, function-level included).

- the package root holds ``__init__.py``, ``schedules.py`` and packages, nothing else;
- every part has a rule (:data:`ALLOWED`): ``quant/`` and ``schedules.py`` import nothing of Flax and
  nothing of the package but ``quant/``; ``models/`` only ``quant/``; ``nn/`` only ``quant/`` and
  ``schedules.py``; a family package (``diffusion/``, ``text/``) only the interface, data and the layers
  below; ``train/`` names no family (no import of a family package, no family name in its code);
- ``train/`` and ``eval/`` never import each other, their command lines (``__main__``) included;
- a command line may import any other part;
- no private name (``_x``) is imported from another module of the package;
- no import circle between modules;
- no source module over 500 lines and no function over 100 lines, unless a ``# long: <reason>``
  comment sits on the ``def`` line or the line above it.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fraqat_jax"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100

BELOW = {"quant", "schedules", "models", "nn"}
FAMILY_PACKAGES = {"diffusion", "text"}
APPS = {"export", "plan", "compare", "pretrain"}
ALLOWED = {  # part -> parts it may import (itself always allowed)
    "quant": set(),
    "schedules": {"quant"},
    "models": {"quant"},
    "nn": {"quant", "schedules"},
    "parallel": set(),
    "cli": set(),
    "data": {"models", "quant"},
    "family": {"nn", "quant", "schedules"},
    "diffusion": {"family", "data", *BELOW},
    "text": {"family", "data", *BELOW},
    "train": {"family", "data", "parallel", "runs", *BELOW},
    "runs": {"train", "family", "parallel", *BELOW},
    "eval": {"family", "data", "parallel", "runs", *FAMILY_PACKAGES, *BELOW},
    "export": {"family", "data", "parallel", "runs", *FAMILY_PACKAGES, *BELOW},
    "plan": {"train", "family", "data", "parallel", "runs", *FAMILY_PACKAGES, *BELOW},
    "compare": {"train", "eval", "export", "family", "data", "parallel", "runs", *FAMILY_PACKAGES, *BELOW},
    "pretrain": {"family", "data", *FAMILY_PACKAGES, *BELOW},
    "generate": {"family", "data", "parallel", "runs", "export", *BELOW},
}
FORBIDDEN = {"train": {"eval", *FAMILY_PACKAGES}, "eval": {"train"},  # command lines included
             "generate": set(FAMILY_PACKAGES)}
ROOT_MODULES = {"__init__.py", "schedules.py"}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: pathlib.Path):
    """``(imported module, imported names)`` for every import statement of a module."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [a.name for a in node.names]
            # "from pkg import submodule" imports the submodule.
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
            rest = [n for n in names if f"{mod}.{n}" not in MODULES]
            if rest or not subs:
                out.append((mod, rest))
            out.extend((s, []) for s in subs)
    return out


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fraqat_jax" or len(parts) < 2:
        return None
    return parts[1]


def _is_command_line(module: str) -> bool:
    return module.endswith(".__main__")


def test_parts_import_only_the_layers_below_them():
    bad = []
    for name, path in MODULES.items():
        part = _part(name)
        if part is None:
            continue
        for mod, _ in _imports(name, path):
            if part in ("quant", "schedules") and mod.split(".")[0] == "flax":
                bad.append(f"{name} imports {mod} (no Flax below nn/)")
            target = _part(mod)
            if target is None or target == part:
                continue
            if target in FORBIDDEN.get(part, ()):
                bad.append(f"{name} imports {mod} ({part}/ never imports {target}/, its command line neither)")
            elif not _is_command_line(name) and target not in ALLOWED.get(part, ()):
                bad.append(f"{name} imports {mod} ({part}/ may import only {sorted(ALLOWED[part]) or 'nothing'})")
    assert not bad, "\n".join(bad)


def test_the_root_holds_only_init_schedules_and_packages():
    files = {p.name for p in ROOT.iterdir() if p.is_file() and p.suffix == ".py"}
    assert files == ROOT_MODULES, f"modules at the package root besides {sorted(ROOT_MODULES)}: {sorted(files - ROOT_MODULES)}"


def _parts() -> set[str]:
    return {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def test_every_part_has_a_rule():
    parts = _parts() | {"schedules"}
    assert parts <= set(ALLOWED), f"parts without an import rule: {sorted(parts - set(ALLOWED))}"


def _family_words() -> set[str]:
    from fraqat_jax.family import families

    words = set()
    for family in families().values():
        words.add(family.name)
        words.update(family.model_classes)
    return words


@pytest.mark.parametrize("part", ["train", "generate"])
def test_train_names_no_family(part):
    """``train/`` and ``generate/`` ask the family interface: no import of a family package, no family
    or model class name as a value in their code, no noise or DDPM (help texts and docstrings may name
    examples)."""
    words, bad = _family_words(), []
    for name, path in MODULES.items():
        if _part(name) != part:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in words:
                bad.append(f"{name}:{node.lineno} uses the family name {node.value!r}")
            ident = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if ident and any(w in ident.lower() for w in ("noise", "ddpm", "diffusion", "latent")):
                bad.append(f"{name}:{node.lineno} names {ident!r}")
        for mod, _ in _imports(name, path):
            if _part(mod) in FAMILY_PACKAGES:
                bad.append(f"{name} imports {mod}")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for name, path in MODULES.items():
        for mod, names in _imports(name, path):
            if _part(mod) is None or mod == name:
                continue
            bad.extend(f"{name} imports {n} from {mod}" for n in names if n.startswith("_") and n != "__version__")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph = {name: sorted({m for m, _ in _imports(name, path) if m in MODULES and m != name})
             for name, path in MODULES.items()}
    # Importing a submodule runs its package's __init__ first; that edge is implicit and not a circle
    # by itself, so only explicit imports are followed.
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _long_reason(lines: list[str], node) -> bool:
    first = node.lineno - 1
    around = lines[max(first - 1, 0): first + 1]
    if node.decorator_list:
        around.append(lines[node.decorator_list[0].lineno - 2] if node.decorator_list[0].lineno >= 2 else "")
    return any("# long:" in line for line in around)


def test_module_and_function_sizes():
    bad = []
    for name, path in MODULES.items():
        text = path.read_text()
        lines = text.splitlines()
        if len(lines) > MAX_MODULE_LINES and "# long:" not in "\n".join(lines[:40]):
            bad.append(f"{name}: {len(lines)} lines (limit {MAX_MODULE_LINES}; or a '# long: reason' near the top)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and not _long_reason(lines, node):
                    bad.append(f"{name}.{node.name}: {n} lines (limit {MAX_FUNCTION_LINES})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("part", sorted(_parts()))
def test_each_part_says_what_it_holds_and_may_import(part):
    doc = ast.get_docstring(ast.parse((ROOT / part / "__init__.py").read_text()))
    assert doc and len(doc) > 80, f"fraqat_jax/{part}/__init__.py needs a docstring: what it holds, what it imports"


README = ROOT.parent / "README.md"


@pytest.mark.parametrize("part", sorted(_parts()) + ["schedules.py"])
def test_the_readme_layout_map_lists_every_part(part):
    text = README.read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[: layout.index("\n## ", 1)]
    entry = part if part.endswith(".py") else f"{part}/"
    assert f"`{entry}`" in layout, f"the README's layout map does not list {entry}"


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """The checker itself: a models/ module importing train/ is reported."""
    fake = tmp_path / "fraqat_jax" / "models"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from fraqat_jax.train.loop import _Run\n")
    imports = _imports("fraqat_jax.models.bad", fake / "bad.py")
    assert ("fraqat_jax.train.loop", ["_Run"]) in imports
    assert _part("fraqat_jax.train.loop") not in ALLOWED["models"]
