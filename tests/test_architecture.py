"""The package's floors (docs/architecture.md), read from the source with ``ast``: no import loop
anywhere (imports inside functions included), imports inside functions only for lazy optional loads,
``core/`` on the leaves only, backends on ``core/``, ``memory`` and themselves only."""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mpsconv"
LEAVES = {"mpsconv.errors", "mpsconv.types", "mpsconv.config", "mpsconv._version", "mpsconv._api"}
#: Imports inside functions that are lazy optional loads: the CLI's subcommands, the autotuner, the
#: Triton kernels (importing Triton costs about a second).
LAZY = {("mpsconv.cli", "mpsconv.demo"), ("mpsconv.cli", "mpsconv.bench"), ("mpsconv.cli", "mpsconv.verify"),
        ("mpsconv.backends", "mpsconv.backends.tuning"),
        ("mpsconv.backends.launch", "mpsconv.backends._triton_kernels")}


def _modules(root: pathlib.Path = PACKAGE) -> dict[str, tuple[pathlib.Path, bool]]:
    """Module name -> (path, whether it is a package's ``__init__``)."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imports(modules) -> list[tuple[str, str, bool, int]]:
    """Every import of a package module: ``(importer, imported, inside a function, line)``. ``from .x
    import y`` imports ``x.y`` where that is a module, else ``x`` (whose attribute ``y`` is)."""
    edges = []
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        inside = {id(node) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for node in ast.walk(f)}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] != "mpsconv":
                    continue
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "mpsconv"]
            edges += [(name, target, id(node) in inside, node.lineno) for target in targets]
    return edges


MODULES = _modules()
IMPORTS = _imports(MODULES)


def _cycles(edges) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and self-imports."""
    graph: dict[str, set[str]] = {}
    for a, b, *_ in edges:
        graph.setdefault(a, set()).add(b)
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_the_package():
    """The checks below read real modules and real imports (a parser that found nothing would pass)."""
    assert {"mpsconv.kernel", "mpsconv.encoder", "mpsconv.core.geometry", "mpsconv.backends.torch"} <= set(MODULES)
    assert ("mpsconv.kernel", "mpsconv.encoder", False) in {e[:3] for e in IMPORTS}
    assert ("mpsconv.backends", "mpsconv.backends.tuning", True) in {e[:3] for e in IMPORTS}


def test_the_cycle_finder_finds_cycles():
    assert _cycles([("a", "b", False, 1), ("b", "c", True, 1), ("c", "a", False, 1), ("c", "d", False, 1)]) == \
        [["a", "b", "c"]]
    assert _cycles([("a", "b", False, 1), ("b", "c", False, 1)]) == []


def test_no_import_loop_anywhere():
    assert _cycles(IMPORTS) == []


def test_imports_inside_functions_are_lazy_optional_loads_only():
    inner = [(a, b, line) for a, b, inside, line in IMPORTS if inside and (a, b) not in LAZY]
    assert inner == [], "imports inside functions that are not lazy optional loads: " + repr(inner)


@pytest.mark.parametrize("floor, allowed", [
    ("mpsconv.core.", lambda target: target in LEAVES or target.startswith("mpsconv.core.")),
    ("mpsconv.backends", lambda target: target in LEAVES or target == "mpsconv.memory"
     or target.startswith(("mpsconv.core.", "mpsconv.backends"))),
    ("mpsconv.memory", lambda target: target in LEAVES or target.startswith("mpsconv.core.")),
], ids=["core", "backends", "memory"])
def test_floors(floor, allowed):
    below = [(a, b, line) for a, b, _, line in IMPORTS if a.startswith(floor) and not allowed(b)]
    assert below == [], f"{floor} imports above its floor: {below}"


def test_leaves_import_only_leaves():
    assert [(a, b) for a, b, *_ in IMPORTS if a in LEAVES and b not in LEAVES] == []


def test_memory_reads_no_private_field():
    """``memory`` works on ConvProblems and byte counts; images keep their fields to themselves."""
    tree = ast.parse((PACKAGE / "memory.py").read_text())
    private = sorted({node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                      and node.attr.startswith("_") and not node.attr.startswith("__")})
    assert private == []
