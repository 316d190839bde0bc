"""The import rules of docs/architecture.md, checked on the source (AST), transitively through project modules:
the library `cltune` never imports `service` or FastAPI; the API never imports the worker or the runner; no
two modules import each other, directly or round a loop (imports inside functions and under TYPE_CHECKING
count: a late import hides a cycle, it does not remove it)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WEB = ("fastapi", "starlette", "uvicorn")
TRAINING_SIDE = ("service.worker", "service.runner")


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, is_package: bool) -> Iterator[str]:
    """Every module name an import statement anywhere in `source` may load (relative ones resolved).

    `from a.b import c` yields both 'a.b' and 'a.b.c' (c may be a submodule).
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names if a.name != "*")


def project_graph() -> dict[str, set[str]]:
    """module -> names it imports, for every .py file in cltune/ and service/ (parents count as imports)."""
    graph: dict[str, set[str]] = {}
    for pkg in ("cltune", "service"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            name = module_name(path)
            deps = set(imported_names(path.read_text(encoding="utf-8"), name, path.name == "__init__.py"))
            parts = name.split(".")
            deps |= {".".join(parts[:i]) for i in range(1, len(parts))}  # importing a.b.c runs a and a.b
            graph[name] = deps
    return graph


def hits(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in forbidden)


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every name reachable from `start` through project modules, with the import chain that reaches it."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        mod = todo.pop()
        for dep in graph.get(mod, ()):
            if dep not in chains:
                chains[dep] = chains[mod] + [dep]
                if dep in graph:
                    todo.append(dep)
    return chains


def violations(graph: dict[str, set[str]], sources: list[str], forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for src in sources:
        for name, chain in reachable(graph, src).items():
            if hits(name, forbidden):
                out.append(" -> ".join(chain))
    return sorted(set(out))


GRAPH = project_graph()


def test_the_library_never_imports_the_service_or_a_web_framework():
    library = [m for m in GRAPH if m == "cltune" or m.startswith("cltune.")]
    assert len(library) >= 10  # the scan really found the library
    assert violations(GRAPH, library, ("service", *WEB)) == []


def test_the_api_never_imports_the_worker_or_the_runner():
    api = [m for m in GRAPH if m.startswith("service.api")]
    if not api:
        pytest.skip("service/api does not exist yet")
    assert violations(GRAPH, api, TRAINING_SIDE) == []


def module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (parent packages and imported names that are not modules
    left out: `import a.b` runs a/__init__, which is not a dependency of a.b's author's choosing)."""
    graph = project_graph()
    own = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    for m, deps in own.items():
        deps -= {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)}
    return own


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other() -> None:
    graph = module_graph()
    assert len(graph) >= 40  # the scan really found both packages
    problems = [f"{c}: " + "; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in cycles(graph)]
    assert problems == []


# ---------------------------------------------------------------- the checker itself


def test_the_checker_finds_import_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_resolves_relative_and_nested_imports():
    src = (
        "import os\n"
        "from .. import worker\n"
        "from ..runner import run_job\n"
        "def f():\n"
        "    import fastapi.responses\n"
        "    from . import deps\n"
    )
    names = set(imported_names(src, "service.api.jobs", is_package=False))
    assert {
        "service.worker",
        "service.runner",
        "service.runner.run_job",
        "fastapi.responses",
        "service.api.deps",
        "os",
    } <= names
    pkg = set(imported_names("from .routes import jobs\n", "service.api", is_package=True))
    assert "service.api.routes.jobs" in pkg


def test_the_checker_finds_an_indirect_violation():
    graph = {
        "service.api.routes.jobs": {"service.store"},
        "service.store": {"service.helpers"},
        "service.helpers": {"service.worker"},
        "service.worker": set(),
    }
    assert violations(graph, ["service.api.routes.jobs"], TRAINING_SIDE) == [
        "service.api.routes.jobs -> service.store -> service.helpers -> service.worker"
    ]
    assert not hits("service.workers_docs", TRAINING_SIDE) and hits("fastapi.routing", WEB)
