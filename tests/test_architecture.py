"""The layout's rules, read from the source with ``ast`` (imports at any level, function-level included).

- ``quant/`` and ``schedules.py`` import nothing of Flax and nothing of the package but ``quant/``;
- ``models/`` imports no other part but ``quant/``; ``nn/`` only ``quant/`` and ``schedules.py``;
- ``diffusion/`` only ``models/``, ``quant/``, ``schedules.py``; ``data/`` no ``train/`` or ``eval/``;
- ``train/`` and ``eval/`` never import each other (their ``__main__`` command lines may use any part);
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

ALLOWED = {  # part -> parts it may import (itself always allowed)
    "quant": set(),
    "schedules": {"quant"},
    "models": {"quant"},
    "nn": {"quant", "schedules"},
    "diffusion": {"models", "quant", "schedules"},
}
FORBIDDEN = {"data": {"train", "eval"}, "train": {"eval"}, "eval": {"train"}}


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
        if part is None or _is_command_line(name):
            continue
        for mod, _ in _imports(name, path):
            if part in ("quant", "schedules") and mod.split(".")[0] == "flax":
                bad.append(f"{name} imports {mod} (no Flax below nn/)")
            target = _part(mod)
            if target is None or target == part:
                continue
            if part in ALLOWED and target not in ALLOWED[part]:
                bad.append(f"{name} imports {mod} ({part}/ may import only {sorted(ALLOWED[part]) or 'nothing'})")
            if target in FORBIDDEN.get(part, ()):
                bad.append(f"{name} imports {mod} ({part}/ never imports {target}/)")
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


@pytest.mark.parametrize("part", ["quant", "nn", "models", "diffusion", "data", "train", "eval"])
def test_each_part_says_what_it_holds_and_may_import(part):
    doc = ast.get_docstring(ast.parse((ROOT / part / "__init__.py").read_text()))
    assert doc and len(doc) > 80, f"fraqat_jax/{part}/__init__.py needs a docstring: what it holds, what it imports"


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """The checker itself: a models/ module importing train/ is reported."""
    fake = tmp_path / "fraqat_jax" / "models"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from fraqat_jax.train.loop import _Run\n")
    imports = _imports("fraqat_jax.models.bad", fake / "bad.py")
    assert ("fraqat_jax.train.loop", ["_Run"]) in imports
    assert _part("fraqat_jax.train.loop") not in ALLOWED["models"]
