"""The package's shape, read from its source with ``ast`` (nothing is imported): no import cycle
among geodet's modules, the floors of the design (``model/`` never imports ``io/``; the per-tile
loop never imports the backend choice or export), and the size limits (modules at most 500
lines, functions at most 80).

Every import counts, also one inside a function: a cycle that closes only at call time still
ties the modules together. ``from . import x`` where ``x`` is a submodule is an edge to ``x``;
``from .pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "geodet"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# the per-tile loop, and what it must not know about: which backend runs, and the ONNX export
TILE_LOOP = "geodet.pipeline.detect"
ABOVE_TILE_LOOP = ("geodet.pipeline.backends", "geodet.pipeline.choice", "geodet.pipeline.convert",
                   "geodet.pipeline.export")
# the QGIS plugin runs in QGIS's Python as its own package (geodet_qgis): sizes apply, and its
# relative imports resolve inside it, so it joins the cycle check as it is


def find_modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package``."""
    out = {}
    for p in sorted(package.rglob("*.py")):
        parts = list(p.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODULES = find_modules(PACKAGE)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _base(name: str, path: Path, level: int, module: str | None) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if level == 0:
        return module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = package[: len(package) - (level - 1)]
    return ".".join(package + ([module] if module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(module of ``modules`` imported, line)`` for every import of ``name`` (at ``path``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = _base(name, path, node.level, node.module)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            # ``import geodet.a.b`` names geodet.a.b; a name below a module resolves to the module
            while t and t not in modules and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in modules and t != name:
                out.append((t, node.lineno))
    return out


def import_graph(modules: dict[str, Path] = MODULES) -> dict[str, dict[str, int]]:
    """module -> {imported module: first line that imports it}."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(name, path, modules):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's components with more than one module: each one holds at least one cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def one_cycle(graph: dict[str, dict[str, int]], comp: list[str]) -> str:
    """A shortest cycle through the first module of ``comp``, with the importing lines."""
    start, members = comp[0], set(comp)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    path.reverse()
                    hops = [f"{a} (line {graph[a][b]})" for a, b in zip(path, path[1:] + [start])]
                    return " -> ".join(hops + [start])
                if w in members and w not in previous and w != start:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {comp}")


def test_the_graph_sees_every_kind_of_import(tmp_path):
    # the checker itself, on a package made for it
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import f\n",
        "a.py": "from . import b\nfrom .sub import thing\n\ndef f():\n    from .sub.c import g\n",
        "b.py": "import pkg.sub.c\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
        "sub/__init__.py": "thing = 1\n",
        "sub/c.py": "from .. import b\nfrom ..a import f\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = import_graph(find_modules(pkg))
    assert graph == {
        "pkg": {"pkg.a": 1},
        "pkg.a": {"pkg.b": 1, "pkg.sub": 2, "pkg.sub.c": 5},
        "pkg.b": {"pkg.sub.c": 1},
        "pkg.sub": {},
        "pkg.sub.c": {"pkg.b": 1, "pkg.a": 2},
    }
    comps = strongly_connected(graph)
    assert comps == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert one_cycle(graph, comps[0]) == "pkg.a (line 5) -> pkg.sub.c (line 2) -> pkg.a"  # the shortest


def test_cycle_finder_reports_a_cycle_it_is_given():
    graph = {"a": {"b": 3}, "b": {"c": 5}, "c": {"a": 7}, "d": {"a": 1}}
    comps = strongly_connected(graph)
    assert comps == [["a", "b", "c"]]
    assert one_cycle(graph, comps[0]) == "a (line 3) -> b (line 5) -> c (line 7) -> a"


def test_no_import_cycle():
    graph = import_graph()
    cycles = [f"{', '.join(c)} import each other, e.g. {one_cycle(graph, c)}" for c in strongly_connected(graph)]
    assert not cycles, "import cycles among geodet modules:\n  " + "\n  ".join(cycles)


@pytest.mark.parametrize("floor,forbidden", [
    # lower floors never import higher ones: io < model < pipeline < training < cli (model apart from io)
    ("geodet.io", ("geodet.model", "geodet.pipeline", "geodet.training", "geodet.cli")),
    ("geodet.model", ("geodet.io", "geodet.pipeline", "geodet.training", "geodet.cli")),
    ("geodet.pipeline", ("geodet.training", "geodet.cli")),
    ("geodet.training", ("geodet.cli",)),
    (TILE_LOOP, ABOVE_TILE_LOOP),
])
def test_floors(floor, forbidden):
    graph = import_graph()
    bad = [f"{m} imports {t} (line {line})" for m, edges in sorted(graph.items())
           if m == floor or m.startswith(floor + ".")
           for t, line in sorted(edges.items()) if any(t == f or t.startswith(f + ".") for f in forbidden)]
    assert not bad, f"{floor} must import nothing from {', '.join(forbidden)}:\n  " + "\n  ".join(bad)


def test_modules_at_most_500_lines():
    big = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in MODULES.values()
           for n in [len(p.read_text(encoding="utf-8").splitlines())] if n > MAX_MODULE_LINES]
    assert not big, f"modules over {MAX_MODULE_LINES} lines:\n  " + "\n  ".join(big)


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, lines)`` of every function and method in ``path``
    (from ``def`` to its last line, docstring included, decorators not)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((prefix + child.name, child.lineno, child.end_lineno - child.lineno + 1))
                walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return out


def test_functions_at_most_80_lines():
    long = [f"{p.relative_to(PACKAGE.parent)}:{line} {fn}: {n} lines" for p in MODULES.values()
            for fn, line, n in function_lengths(p) if n > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(long)
