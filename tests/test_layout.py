"""The package map (docs/architecture.md) as a test: every `import` in the source, top-level or
inside a function, is read from the syntax tree; package arrows must point the allowed way, and
no two modules may import each other, directly or round a longer circle."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = (
    "models",
    "cluster",
    "serving",
    "routing",
    "policies",
    "observability",
    "training",
    "agents",
    "chaos",
    "expertmesh",
)
ALLOWED: dict[str, set[str]] = {
    "observability": set(),
    "policies": {"observability"},
    "routing": {"policies", "observability"},
    "models": {"observability"},
    "cluster": {"models", "observability"},
    "training": {"models", "observability"},
    "serving": {"cluster", "models", "routing", "policies", "observability"},
    "agents": {"serving", "cluster", "models", "routing", "policies", "observability"},
    "chaos": {"agents", "serving", "cluster", "models", "routing", "policies", "observability"},
    "expertmesh": set(PACKAGES) - {"expertmesh"},
}
"""Which packages each package may import (the CLI package `expertmesh` wires all of them)."""


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] != "expertmesh":
        parts.insert(0, "expertmesh")
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "demo" not in path.relative_to(REPO).parts:
                out[module_name(path)] = path
    return out


def imports_of(path: Path, name: str) -> Iterator[str]:
    """Absolute names of the expertmesh modules that the module `name` at `path` imports."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            yield parent
            for alias in node.names:
                yield f"{parent}.{alias.name}"


def graph() -> dict[str, set[str]]:
    modules = source_modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges[name] = {
            target
            for target in imports_of(path, name)
            if target in modules and target != name and not name.startswith(target + ".")
        }
    return edges


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "expertmesh"


def test_every_package_arrow_points_the_allowed_way() -> None:
    wrong = sorted(
        f"{source} imports {target} ({package_of(source)} -> {package_of(target)})"
        for source, targets in graph().items()
        for target in targets
        if package_of(source) != package_of(target)
        and package_of(target) not in ALLOWED[package_of(source)]
    )
    assert not wrong, "imports against the package map:\n" + "\n".join(wrong)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_round_a_circle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_opens_with_a_docstring_saying_what_it_owns(package: str) -> None:
    tree = ast.parse((REPO / package / "__init__.py").read_text())
    doc = ast.get_docstring(tree)
    assert doc and len(doc.split()) >= 12 and "not built yet" not in doc, package


def test_relative_imports_resolve_to_real_modules() -> None:
    """A mistyped relative import would silently drop out of the graph above."""
    modules = source_modules()
    missing = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
                target = ".".join([*base, node.module])
                if target not in modules:
                    missing.append(f"{name}: from {'.' * node.level}{node.module}")
    assert not missing, missing
