"""The layout's rules, read from the source with ``ast`` (imports at any level, function-level included).

- the package root holds ``__init__.py``, ``schedules.py`` and packages, nothing else;
- every part has a rule (:data:`ALLOWED`): ``quant/`` and ``schedules.py`` import nothing of Flax and
  nothing of the package but ``quant/``; ``models/`` only ``quant/`` and
  ``parallel/`` (the mesh axis names its attention kernels split over); ``parallel/`` nothing of the
  package; ``nn/`` only ``quant/`` and
  ``schedules.py``; ``family/`` (the interface) only ``nn/`` below it and no implementation, not even
  by name in a string; a family package (``diffusion/``, ``text/``) only the interface, data and the
  layers below; ``recipe/`` (what a run is) the interface and the layers below, never a command part;
- the commands (``train/``, ``eval/``, ``export/``, ``plan/``, ``compare/``, ``runs/``, ``recipe/``)
  learn about a model only through its family: they import no family package and name no family or
  model class in their code (help texts, docstrings and comments may), command lines included;
- ``runs/``, ``eval/``, ``export/`` and ``plan/`` import nothing of ``train/`` (they read what a run
  is from ``recipe/``), and ``train/`` nothing of ``eval/``, their command lines (``__main__``)
  included; any other command line may import any other part;
- no private name (``_x``) is imported from another module of the package;
- no import circle between modules, counting the implicit edge from a module to the packages it is in
  (importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first);
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
#: The parts that learn about a model only through its family object.
THROUGH_THE_FAMILY = {"train", "eval", "export", "plan", "compare", "runs", "recipe", "generate"}
ALLOWED = {  # part -> parts it may import (itself always allowed)
    "quant": set(),
    "schedules": {"quant"},
    "models": {"quant", "parallel"},
    "nn": {"quant", "schedules"},
    "parallel": set(),
    "cli": set(),
    "deploy": {"cli"},
    "data": {"models", "quant"},
    "family": {"nn"},
    "diffusion": {"family", "data", *BELOW},
    "text": {"family", "data", *BELOW},
    "recipe": {"family", "data", "parallel", *BELOW},
    "train": {"recipe", "family", "data", "parallel", "runs", *BELOW},
    "runs": {"recipe", "family", "parallel", *BELOW},
    "eval": {"recipe", "family", "data", "parallel", "runs", *BELOW},
    "export": {"recipe", "family", "data", "parallel", "runs", "deploy", *BELOW},
    "plan": {"recipe", "family", "data", "parallel", "runs", *BELOW},
    "compare": {"train", "eval", "export", "recipe", "family", "data", "parallel", "runs", *BELOW},
    "pretrain": {"family", "data", *FAMILY_PACKAGES, *BELOW},
    "generate": {"recipe", "family", "data", "parallel", "runs", "export", *BELOW},
}
FORBIDDEN = {  # command lines included
    **{part: set(FAMILY_PACKAGES) for part in THROUGH_THE_FAMILY},
    "train": {"eval", *FAMILY_PACKAGES},
    "eval": {"train", *FAMILY_PACKAGES},
    "runs": {"train", *FAMILY_PACKAGES},
    "plan": {"train", *FAMILY_PACKAGES},
    "export": {"train", *FAMILY_PACKAGES},
    "recipe": {"train", "runs", "eval", "export", "plan", "compare", *FAMILY_PACKAGES},
}
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


#: Model-family names that the command parts must not hold in their code (any case, as a word).
FAMILY_NAMES = ("dit", "pixart", "sd3", "sana", "flux", "gemma")


def _help_strings(tree) -> set[int]:
    """ids of the string constants that are docstrings, ``help=``/``description=``/``epilog=`` texts,
    argument and group titles, or a config key's help (``setting(default, help)``): they may name
    examples."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
        if isinstance(node, ast.keyword) and node.arg in ("help", "description", "epilog"):
            out.update(id(n) for n in ast.walk(node.value) if isinstance(n, ast.Constant))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("add_argument_group", "add_argument")):
            out.update(id(n) for a in node.args for n in ast.walk(a) if isinstance(n, ast.Constant))
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "setting":
            out.update(id(n) for a in node.args[1:2] for n in ast.walk(a) if isinstance(n, ast.Constant))
    return out


def _names_a_family(text: str, words: set[str]) -> str | None:
    import re

    for w in (*FAMILY_NAMES, *words):
        if re.search(rf"(?<![a-z0-9]){re.escape(w.lower())}", text.lower()):
            return w
    return None


@pytest.mark.parametrize("part", sorted(THROUGH_THE_FAMILY))
def test_command_parts_learn_about_a_model_only_through_its_family(part):
    """No import of a family package and no family or model class name in code (identifiers and
    string values; docstrings, help texts and comments may name examples); ``train/`` and
    ``recipe/`` name no noise or DDPM either."""
    words, bad = _family_words(), []
    for name, path in MODULES.items():
        if _part(name) != part:
            continue
        tree = ast.parse(path.read_text())
        helps = _help_strings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in helps:
                hit = _names_a_family(node.value, words)
                if hit:
                    bad.append(f"{name}:{node.lineno} names the family {hit!r} in {node.value[:60]!r}")
            ident = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if ident and _names_a_family(ident, words):
                bad.append(f"{name}:{node.lineno} names {ident!r}")
            if part in ("train", "recipe") and ident and any(
                    w in ident.lower() for w in ("noise", "ddpm", "diffusion", "latent")):
                bad.append(f"{name}:{node.lineno} names {ident!r}")
        for mod, _ in _imports(name, path):
            if _part(mod) in FAMILY_PACKAGES:
                bad.append(f"{name} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_interface_names_no_implementation():
    """``family/`` finds its implementations through entry points: no file in it names a family
    package, docstrings included."""
    bad = [f"{p.relative_to(ROOT.parent)} names fraqat_jax.{pkg}" for p in sorted((ROOT / "family").rglob("*.py"))
           for pkg in sorted(FAMILY_PACKAGES) if f"fraqat_jax.{pkg}" in p.read_text()]
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for name, path in MODULES.items():
        for mod, names in _imports(name, path):
            if _part(mod) is None or mod == name:
                continue
            bad.extend(f"{name} imports {n} from {mod}" for n in names if n.startswith("_") and n != "__version__")
    assert not bad, "\n".join(bad)


def _with_packages(module: str) -> set[str]:
    """``module`` and the packages it is in below the root (``fraqat_jax.a.b.c`` -> ``fraqat_jax.a``,
    ``fraqat_jax.a.b``, itself): importing it runs each of their ``__init__`` first."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & set(MODULES)


def test_no_import_circles():
    graph = {name: sorted({t for m, _ in _imports(name, path) if m in MODULES for t in _with_packages(m)}
                          - {name} - _with_packages(name))
             for name, path in MODULES.items()}
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
