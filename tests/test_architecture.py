"""The package layout: no import cycles among modules, and the runtime never imports model development.

The graph is read from the source (every ``import`` statement, including those inside functions),
so a cycle hidden behind a lazy import is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lungburden"

#: Packages whose modules a runtime install (without the ``train`` extra) imports.
RUNTIME = ("config", "dicom_io", "segmentation", "results", "jobs", "dicom_node", "orthanc_plugin", "phantom",
           "archive")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = {f"{base}.{a.name}" for a in node.names} & modules.keys()
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined by the module ``base`` itself
                found.add(base)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", RUNTIME)
def test_runtime_does_not_import_training(package):
    graph = _graph()
    offending = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith(f"lungburden.{package}")
                       for t in targets if t.startswith("lungburden.training"))
    assert not offending


def test_every_package_module_is_reachable_by_its_package():
    """No stray modules: every module lives in a package with an ``__init__``."""
    for path in PACKAGE.rglob("*.py"):
        assert (path.parent / "__init__.py").exists(), path
