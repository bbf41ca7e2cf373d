"""The layers, checked on the import graph: the core imports no adapter and no Ray, and nothing imports in a circle.

Every import counts, at module level, inside functions and under ``TYPE_CHECKING``: a lazy import
is still a dependency, and a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sentiment", "deployments", "pipelines", "ray_sentiment")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module ``path`` imports (project modules by name, others by their top-level name)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                # `from pipelines import files` imports the module pipelines.files.
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if submodule in known else node.module)
    return {name if name in known else name.split(".")[0] for name in names}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def test_the_core_imports_no_adapter_and_no_ray_not_even_inside_functions() -> None:
    edges = graph()
    leaks = {
        (module, target)
        for module, targets in edges.items()
        if module.split(".")[0] == "sentiment"
        for target in targets
        if target.split(".")[0] in ("deployments", "pipelines", "ray_sentiment", "ray")
    }
    assert not leaks


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if target not in edges:
                continue
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)
