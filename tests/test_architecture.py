"""The package's layer rule, checked on its source with the standard library's ``ast``.

Apps may import anything; merging, surgery and bias never import a setting and settings never import them;
core imports nothing above itself; no import cycle; no function-level import of a package module outside
``cli.py`` (the one plugin lookup of a setting goes through ``importlib`` by name).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "surgery_lib"
APPS = {
    "cli",
    "grid",
    "cluster",
    "plots",
    "diagrams",
    "tables",
    "book",
    "reproduce",
    "benchmark",
    "__main__",
    "",
}  # "" is the package's __init__

#: Layer -> the layers it may import (besides itself).
ALLOWED = {
    "core": set(),
    "finetuning": {"core"},
    "presets": {"core", "finetuning"},
    "models": {"core", "presets"},
    "evaluation": {"core", "presets", "models"},
    "bias": {"core", "models"},
    "settings.base": {"core", "presets", "models", "evaluation"},
    "settings": {"core", "presets", "settings.base"},
    "settings.<one>": {"core", "presets", "finetuning", "models", "evaluation", "settings.base"},
    "merging": {"core", "presets", "models", "evaluation", "settings.base"},
    "surgery": {"core", "presets", "models", "evaluation", "settings.base", "bias"},
    "disentanglement": {"core", "presets", "models", "merging"},
}


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """``({module: imported package modules}, [(module, lazily imported module)])`` of the package in ``root``."""
    name = root.name
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges: dict[str, set[str]] = {m: set() for m in modules}
    lazy: list[tuple[str, str]] = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, depth: int, module: str = module, is_package: bool = is_package) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue  # annotations only
                inner = depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                targets: list[str] = []
                if isinstance(child, ast.Import):
                    targets = [alias.name for alias in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        anchor = module if is_package else module.rpartition(".")[0]
                        for _ in range(child.level - 1):
                            anchor = anchor.rpartition(".")[0]
                        base = f"{anchor}.{base}".rstrip(".")
                    targets = [f"{base}.{alias.name}" for alias in child.names]
                for target in targets:
                    if target == name or target.startswith(name + "."):
                        resolved = resolve(target)
                        if resolved and resolved != module:
                            edges[module].add(resolved)
                            if inner:
                                lazy.append((module, resolved))
                visit(child, inner)

        visit(ast.parse(path.read_text()), 0)
    return edges, lazy


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def layer(module: str) -> str:
    """``surgery_lib.settings.clip.zoo`` -> ``settings.<one>``; ``surgery_lib.merging.ties`` -> ``merging``."""
    parts = module.split(".")[1:]
    if not parts or parts[0] in APPS:
        return "app"
    if parts[0] == "settings":
        if len(parts) == 1:
            return "settings"
        return "settings.base" if parts[1] == "base" else "settings.<one>"
    return parts[0]


EDGES, LAZY = import_graph(PACKAGE)


def test_there_is_no_import_cycle():
    assert cycles(EDGES) == []


def test_no_function_level_import_of_a_package_module_outside_the_cli():
    assert [(m, t) for m, t in LAZY if not m.endswith(".cli")] == []


def test_every_module_imports_only_layers_below_it():
    wrong = []
    for module, targets in EDGES.items():
        kind = layer(module)
        if kind == "app" or module.endswith("core.compat"):
            continue
        for target in targets:
            other = layer(target)
            same = other == kind and (kind != "settings.<one>" or target.split(".")[2] == module.split(".")[2])
            if not same and other not in ALLOWED[kind]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_the_checker_finds_a_cycle_and_a_lazy_import(tmp_path):
    package = tmp_path / "toy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from toy.b import f\n")
    (package / "b.py").write_text("def f():\n    from toy import c\n")
    (package / "c.py").write_text("import toy.a\n")
    edges, lazy = import_graph(package)
    assert cycles(edges) == [["toy.a", "toy.b", "toy.c"]] and lazy == [("toy.b", "toy.c")]


@pytest.mark.parametrize("module", ["surgery_lib.merging.ties", "surgery_lib.surgery.v1", "surgery_lib.bias"])
def test_algorithms_do_not_reach_a_setting(module):
    assert not any(layer(t) == "settings.<one>" for t in EDGES[module])


def test_the_package_docstring_names_every_module():
    import surgery_lib

    package = Path(surgery_lib.__file__).parent
    modules = sorted(
        p.stem if p.is_file() else p.name
        for p in package.iterdir()
        if (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))
        or (p.is_dir() and (p / "__init__.py").exists())
    )
    missing = [
        m
        for m in modules
        if f"surgery_lib.{m}`" not in surgery_lib.__doc__ and f"~surgery_lib.{m}`" not in surgery_lib.__doc__
    ]
    assert missing == []


def test_a_settings_own_preset_section_is_read_only_in_its_folder():
    """A setting's section of a preset (``setting_config``) is its own: outside ``settings/<name>/`` only the
    generic schema (``presets.py``: the ``tasks`` and ``surgery_v2_rank`` keys) reads it, and nothing reads the
    0.2 field ``preset.clip``; what an algorithm needs of a setting comes through the :class:`Zoo`."""
    readers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "presets.py" or (relative.startswith("settings/") and relative.count("/") == 2):
            continue
        text = path.read_text()
        if re.search(r"\bsetting_config\b|preset\.clip\b", text):
            readers.append(relative)
    assert readers == []
