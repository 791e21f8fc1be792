"""The package's layers: no import cycle inside `aaren`, and the functional layer below the rest.

Read from the source with `ast` rather than from `sys.modules`, so that every import
statement counts, a lazy one inside a function included (a cycle through a lazy import
still ties the two modules together; it only fails later, at call time).
"""
import ast
import importlib.machinery
import pathlib

import pytest

import aaren

PACKAGE = pathlib.Path(aaren.__file__).resolve().parent


def _module_name(path: pathlib.Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    parts = [part for part in relative.parts if part != "__init__"]
    return ".".join(["aaren", *parts])


def _sources():
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name: str, known) -> bool:
    """A module of the package: a source file (the generated `_build_config` included), or a
    compiled extension (`_C`)."""
    if name in known:
        return True
    if not name.startswith("aaren."):
        return False
    stem = PACKAGE.joinpath(*name.split(".")[1:])
    return any(stem.with_name(stem.name + suffix).exists()
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _imports(name: str, path: pathlib.Path, known) -> set:
    """The aaren modules (of `known`) that `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from X import Y` depends on module X.Y where there is one, on X for a name
            # defined in X (X's parent packages are imported first whatever the statement).
            targets = [f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}", known)
                       else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                found.add(target)
    return found


def _graph():
    sources = _sources()
    return {name: _imports(name, path, sources) for name, path in sources.items()}


def _cycles(graph):
    """Every strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_the_package():
    graph = _graph()
    assert {"aaren.functional", "aaren.modules", "aaren.distributed", "aaren.hf"} <= set(graph)
    # A lazy import (inside a function) is an edge too.
    assert "aaren._context_parallel" in graph["aaren.modules"]
    assert "aaren.functional" in graph["aaren._fast_step"]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_functional_layer_imports_nothing_above_it():
    graph = _graph()
    allowed = {"aaren._library"}
    assert graph["aaren.functional"] <= allowed
    assert graph["aaren._context_parallel"] <= allowed | {"aaren.functional"}


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_cycle_finder(graph, expected):
    assert _cycles(graph) == expected


def test_relative_imports_resolve(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from . import a\nfrom .b import x\ndef f():\n    from .c import y\n"
                      "import aaren.d\nfrom aaren import e\n")
    known = {f"aaren.{n}" for n in "abcde"} | {"aaren", "aaren.m"}
    assert _imports("aaren.m", source, known) == {"aaren.a", "aaren.b", "aaren.c", "aaren.d",
                                                  "aaren.e"}
    # A name defined in the package's __init__ is an edge to the package itself.
    source.write_text("from aaren import scan\nfrom .. import aaren_sibling\n")
    assert _imports("aaren.m", source, known) == {"aaren"}
