"""The shape rules of docs/development.md, checked on the package's own source.

Modules stay small (≤ 500 lines) and functions short (≤ 80 lines); the core never imports napari
or Qt; inference never imports training; no two modules import each other, directly or in a
ring (lazy, function-level imports count too: a cycle is a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_cryoddm"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
GUI = ("napari", "qtpy", "magicgui", "PyQt5", "PyQt6", "PySide2", "PySide6", "vispy", "superqt")
TRAINING = {"train", "train_config", "train_data", "train_loop"}
INFERENCE = {"predict", "tiling", "distributed", "estimators", "preprocess", "devices"}


def modules() -> dict[str, Path]:
    """Dotted name below the package (e.g. `io.mrc`, `_napari.widgets.picker`) → file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """First-party modules imported anywhere in the file (dotted, below the package), and
    third-party top-level names prefixed with '!'."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("napari_cryoddm"):
                    found.add(alias.name.removeprefix("napari_cryoddm").lstrip("."))
                else:
                    found.add("!" + alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                mod = node.module or ""
                if mod.startswith("napari_cryoddm"):
                    base = mod.removeprefix("napari_cryoddm").lstrip(".")
                    found.update(_resolve(base, node.names))
                else:
                    found.add("!" + mod.split(".")[0])
                continue
            anchor = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            base = ".".join([*anchor, *(node.module.split(".") if node.module else [])])
            found.update(_resolve(base, node.names))
    return found


def _resolve(base: str, names: list[ast.alias]) -> set[str]:
    """`from base import x`: x is a module when such a file exists, else a name in `base`."""
    known = modules()
    out = set()
    for alias in names:
        sub = f"{base}.{alias.name}" if base else alias.name
        out.add(sub if sub in known else base)
    return {m for m in out if m}


GRAPH = {name: imports(name, path) for name, path in modules().items()}


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_is_small(name: str) -> None:
    lines = len(modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name}: {lines} lines (split it by what it holds)"


def test_functions_are_short() -> None:
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, "functions over 80 lines: " + "; ".join(long)


def test_core_never_imports_napari_or_qt() -> None:
    bad = {
        name: sorted(m[1:] for m in deps if m.startswith("!") and m[1:] in GUI)
        for name, deps in GRAPH.items()
        if not name.startswith("_napari")
    }
    assert not {k: v for k, v in bad.items() if v}


def test_inference_never_imports_training() -> None:
    bad = {name: sorted(deps & TRAINING) for name, deps in GRAPH.items() if name in INFERENCE}
    assert not {k: v for k, v in bad.items() if v}


def test_no_import_cycles() -> None:
    graph = {
        name: {d for d in deps if not d.startswith("!") and d in GRAPH and d != name} for name, deps in GRAPH.items()
    }
    # a package's __init__ re-exporting its children is not a cycle with them
    for name in graph:
        graph[name] = {
            d
            for d in graph[name]
            if not (d.startswith(name + ".") or name.startswith(d + ".") and modules()[d].name == "__init__.py")
        }
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if seen.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in seen:
                visit(dep)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_the_checker_sees_imports() -> None:
    """The rules above pass because the graph is right, not because it is empty."""
    assert "tiling" in GRAPH["predict"] and "devices" in GRAPH["predict"]
    assert "train_loop" in GRAPH["train"] and "forward_layout" in GRAPH["train"]
    assert "!torch" in GRAPH["model"] and "!napari" in GRAPH["_napari.layers"]
    assert "simulation.quality" in GRAPH["simulation.demo"]
