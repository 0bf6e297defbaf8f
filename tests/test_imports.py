"""No import cycles among jaxcam's modules, counting imports inside functions.

The graph is built from the source (AST), not by importing: an edge ``a -> b``
for every ``import b`` / ``from b import x`` anywhere in ``a`` (module level,
functions, methods, ``if TYPE_CHECKING`` blocks alike). ``from jaxcam import x``
and ``from jaxcam.p import x`` mean module ``jaxcam.x`` / ``jaxcam.p.x`` when
that is a module, else the package itself. A package is not an implicit
dependency of its submodules (Python imports ``jaxcam/data/__init__`` before
``jaxcam.data.pipeline``, but that order cannot deadlock: the package's
``__init__`` runs first and completes its own imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "jaxcam"


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` for every module of the package."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def imports_of(name: str, modules: dict[str, Path]) -> set[str]:
    """The jaxcam modules ``name`` imports anywhere in its source."""
    tree = ast.parse(modules[name].read_text(), filename=str(modules[name]))
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # the longest prefix of ``target`` that is a jaxcam module
        parts = target.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in modules:
                found.add(candidate)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:  # from jaxcam import checkpoint
                    found.add(f"{source}.{alias.name}")
                else:
                    add(source)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, modules) for name in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` if the graph has any (iterative DFS), else None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        color[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                color[node] = BLACK
            elif color.get(child, BLACK) == GREY:
                return path[path.index(child):] + [child]
            elif color.get(child) == WHITE:
                color[child] = GREY
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_the_graph_sees_module_level_function_level_and_from_package_imports():
    graph = import_graph()
    # module level: from jaxcam.preprocessing import Preprocessing
    assert "jaxcam.preprocessing" in graph["jaxcam.checkpoint"]
    # inside a function, written as `from jaxcam import models`
    assert "jaxcam.models" in graph["jaxcam.checkpoint"]
    # `import jaxcam` is the package itself
    assert "jaxcam" in graph["jaxcam.checkpoint"]
    # `from jaxcam.checkpoint import LoadedModel`: the module, not a module "LoadedModel"
    assert "jaxcam.checkpoint" in graph["jaxcam.loading"]


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_jaxcam_modules_import_each_other_without_cycles():
    graph = import_graph()
    assert len(graph) > 30  # the whole package was scanned
    cycle = find_cycle(graph)
    if cycle is not None:
        pytest.fail("import cycle among jaxcam modules: " + " -> ".join(cycle))


def test_loading_checkpoint_and_weights_are_layered():
    """The layering issue 17 asked for: weights <- checkpoint <- loading, one way."""
    graph = import_graph()
    assert "jaxcam.loading" not in graph["jaxcam.checkpoint"]
    assert "jaxcam.weights" not in graph["jaxcam.checkpoint"]
    assert not {"jaxcam.checkpoint", "jaxcam.loading"} & graph["jaxcam.weights"]
