"""The code's shape, checked from the source: one import namespace, a one-way import graph, small files.

Imports are read with ``ast`` (every ``import``/``from ... import`` in a module, including ones inside
functions; ``if TYPE_CHECKING:`` blocks are skipped, they never run), so nothing is imported to check them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import name -> folder (the folders keep their names; see pyproject.toml's package-dir)
PACKAGES = {
    "loramux.core": ROOT / "core",
    "loramux.service": ROOT / "service",
    "loramux.demo": ROOT / "demo",
    "loramux.client": ROOT / "clients" / "loramux" / "client",
    "loramux.deploy": ROOT / "deploy",
}
# Which core subpackage may import which (errors: everyone). engine -> adapters -> lora; engine -> model.
CORE_LAYERS = {
    "errors": set(),
    "memory": set(),
    "serial": set(),
    "native": set(),
    "lora": {"errors", "memory", "serial", "native"},
    "model": {"errors", "memory", "serial", "native"},
    "adapters": {"errors", "memory", "serial", "lora"},
    "engine": {"errors", "memory", "serial", "native", "lora", "model", "adapters"},
}
MAX_LINES = 400
OLD_TOP_LEVEL = ("core", "service", "clients", "demo", "deploy")


def modules() -> dict[str, Path]:
    """Every module of the five packages by its import name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, minus the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path) -> set[str]:
    """The absolute module names ``name`` imports (``from a import b`` counts a.b when that is a module)."""
    known = modules()
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: level 1 is this package, 2 its parent, ...
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return found


def test_every_import_is_in_the_loramux_namespace() -> None:
    """Nothing imports the folders under their own names: installed, only `loramux` exists."""
    offenders = []
    for folder in ("core", "service", "clients", "demo", "deploy", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "node_modules" in path.parts or "v1" in path.parts:
                continue
            for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in OLD_TOP_LEVEL]
    assert not offenders


def test_core_imports_no_grpc_service_or_client() -> None:
    bad = {
        f"{name}: {imported}"
        for name, path in modules().items()
        if name.startswith("loramux.core")
        for imported in imports_of(name, path)
        if imported.split(".")[0] in ("grpc", "grpc_status", "google")
        or imported.startswith(("loramux.service", "loramux.client", "loramux.v1", "loramux.demo", "loramux.deploy"))
    }
    assert not bad


def test_the_client_imports_nothing_of_the_server() -> None:
    bad = {
        f"{name}: {imported}"
        for name, path in modules().items()
        if name.startswith("loramux.client")
        for imported in imports_of(name, path)
        if imported.split(".")[0] in ("torch", "transformers", "safetensors", "peft")
        or imported.startswith(("loramux.core", "loramux.service", "loramux.demo", "loramux.deploy"))
    }
    assert not bad


def test_nothing_imports_deploy() -> None:
    """loramux.deploy sits on top (it runs servers and balancers; it may import service, client, core, demo):
    no other package imports it. Tests and benchmarks may."""
    bad = {
        f"{name}: {imported}"
        for name, path in modules().items()
        if not name.startswith("loramux.deploy")
        for imported in imports_of(name, path)
        if imported.startswith("loramux.deploy")
    }
    assert not bad


def _core_layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["loramux", "core"] else None


def test_core_subpackages_import_one_way() -> None:
    """engine -> adapters -> lora, engine -> model, everything -> errors, memory and serial; loramux.core's own
    __init__ (the public API, imported lazily) is exempt."""
    bad = []
    for name, path in modules().items():
        layer = _core_layer(name)
        if layer is None:
            continue
        for imported in imports_of(name, path):
            target = _core_layer(imported)
            if target is not None and target != layer and target not in CORE_LAYERS[layer]:
                bad.append(f"{name} -> {imported}")
    assert not bad


def test_core_has_no_import_cycle() -> None:
    known = modules()
    graph = {
        name: {i for i in imports_of(name, path) if i in known and i.startswith("loramux.core") and i != name}
        for name, path in known.items()
        if name.startswith("loramux.core") and name != "loramux.core"
    }
    # a package's __init__ runs before its submodules: importing a.b imports a first
    for name in list(graph):
        parent = name.rpartition(".")[0]
        if parent in graph:
            graph[name].add(parent)
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [*path, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


@pytest.mark.parametrize("folder", ["core", "service", "clients/loramux/client", "deploy"])
def test_no_file_is_over_the_line_budget(folder: str) -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / folder).rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"over {MAX_LINES} lines: {long}"
