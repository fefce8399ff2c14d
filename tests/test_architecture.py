"""The layout of src/ntkit keeps its promises (DESIGN.md section 2, issue 13 item 6).

Witnesses: the import statements themselves, read with `ast` from every module
(not imported, so a cycle cannot hide behind import order), and a fresh
interpreter for what ``import ntkit`` loads.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

import ntkit as nk

SRC = Path(nk.__file__).resolve().parent
#: The most lines a module of src/ntkit may have (the target is ~600).
MAX_LINES = 650


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:`` (never runs)."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> set[str]:
    """The ntkit modules an import statement of ``module`` loads by name (its parent
    packages' ``__init__`` aside)."""
    if isinstance(node, ast.Import):
        names = {a.name for a in node.names}
    else:
        if node.level:
            base = module.split(".")
            if not is_package:
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = set()
        for alias in node.names:
            sub = f"{prefix}.{alias.name}"
            names.add(sub if sub in MODULES else prefix)  # `from . import x`: x a module?
    found = set()
    for name in names:
        # `import ntkit.a.b` names ntkit.a.b; a name inside a module resolves to the module
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith("ntkit"):
            found.add(name)
    return found


def _imports(module: str, source: str | None = None, is_package: bool | None = None
             ) -> tuple[set[str], set[str]]:
    """``(module_level, in_functions)``: the ntkit modules ``module`` imports when it is
    loaded (class bodies included, ``if TYPE_CHECKING`` blocks excluded), and those it
    imports inside functions. ``source`` (default: the module's file) is its code."""
    if source is None:
        path = MODULES[module]
        source, is_package = path.read_text(), path.name == "__init__.py"
    tree = ast.parse(source)
    top: set[str] = set()
    inner: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:
                    visit_stmt(stmt, in_function)
                continue
            visit_stmt(child, in_function)

    def visit_stmt(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            (inner if in_function else top).update(
                t for t in _targets(node, module, is_package) if t != module)
        is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        visit(node, in_function or is_function)

    visit(tree, False)
    return top, inner


GRAPH = {m: _imports(m) for m in MODULES}


def _closure(start: str) -> set[str]:
    """Every ntkit module that loading ``start`` loads by module-level imports."""
    seen, todo = set(), [start]
    while todo:
        for t in GRAPH[todo.pop()][0]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def _find_cycle() -> list[str] | None:
    """A cycle of module-level imports, as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(GRAPH[m][0]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := dfs(t)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := dfs(m)):
            return found
    return None


# ------------------------------------------------------------------ the reader
def test_graph_reader_sees_every_kind_of_import():
    """The reader itself, on statements whose targets are known: relative imports of
    modules and of names, absolute ones, function-level ones, TYPE_CHECKING blocks."""
    source = (
        "from __future__ import annotations\n"
        "import os, ntkit.tiling\n"
        "from typing import TYPE_CHECKING\n"
        "from .._budget import parse_memory\n"            # a name from a module
        "from .. import kernel\n"                         # a module from a package
        "from ._job import Job\n"                         # a sibling
        "if TYPE_CHECKING:\n"
        "    from ..layers.base import Layer\n"           # never runs
        "class A:\n"
        "    from ..errors import StoreError\n"           # runs at import
        "def f():\n"
        "    from ..layers import Linear\n"               # runs when called
        "    return lambda: __import__('x')\n"
    )
    top, inner = _imports("ntkit.kernel_matrix._api", source, is_package=False)
    assert top == {"ntkit.tiling", "ntkit._budget", "ntkit.kernel", "ntkit.kernel_matrix._job",
                   "ntkit.errors"}
    assert inner == {"ntkit.layers"}
    # in a package's __init__, `.x` is the package's own submodule
    top, _ = _imports("ntkit.kernel_matrix", "from ._api import kernel_matrix\n",
                      is_package=True)
    assert top == {"ntkit.kernel_matrix._api"}
    # the real files: a reader that saw nothing would pass every test below
    assert "ntkit.tiling" in GRAPH["ntkit.layers.base"][0]
    assert sum(len(top) for top, _ in GRAPH.values()) > len(GRAPH) // 2


# --------------------------------------------------------------------- layering
def test_no_cycle_among_module_level_imports():
    """Loading any module never needs a module that is still loading (DESIGN.md: data
    flows one way). Package ``__init__``s importing their own submodules are the
    only back edges Python allows, and none is counted here."""
    assert _find_cycle() is None, " -> ".join(_find_cycle() or [])


def test_budget_and_kernel_are_leaves():
    """_budget (budgets, tiles, progress) and kernel (Kernel, input_kernel) import
    nothing of ntkit, at module level or inside functions."""
    for leaf in ("ntkit._budget", "ntkit.kernel"):
        top, inner = GRAPH[leaf]
        assert not top and not inner, (leaf, top, inner)


def test_tiling_sits_below_the_layers():
    """tiling loads no layer module; layers.base loads tiling (the rule runs in tiles)."""
    assert not {m for m in _closure("ntkit.tiling") if m.startswith("ntkit.layers")}
    assert "ntkit.tiling" in _closure("ntkit.layers")


def _layer_imports(prefix: str) -> dict[str, set[str]]:
    out = {}
    for m, (top, inner) in GRAPH.items():
        if m == prefix or m.startswith(prefix + "."):
            bad = {t for t in top | inner | _closure(m) if t.split(".")[:2] == ["ntkit", "layers"]}
            if bad:
                out[m] = bad
    return out


@pytest.mark.parametrize("prefix", ["ntkit.predict", "ntkit.solvers", "ntkit.kernel_matrix"])
def test_kernel_consumers_import_no_layer(prefix):
    """predict, solvers and kernel_matrix know a network only through the one adapter
    (ntkit.kernel_function): none of their modules imports a layer module, directly
    (at any level) or through what it loads."""
    assert prefix in MODULES
    assert _layer_imports(prefix) == {}


def test_no_module_is_too_long():
    """Files that hold several concepts are split (issue 13: ~600 lines)."""
    lengths = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in lengths.items() if n > MAX_LINES} == {}


# ------------------------------------------------------------- public surface
LAZY = ["predict", "solvers", "sklearn", "plot", "spec", "empirical", "datasets", "demo", "cli",
        "errors"]


@pytest.mark.parametrize("name", LAZY)
def test_public_submodules_are_attributes(name):
    """``nk.predict`` etc. are the submodules themselves (imported on first access)."""
    module = getattr(nk, name)
    assert isinstance(module, types.ModuleType)
    assert module is importlib.import_module(f"ntkit.{name}")
    assert name in dir(nk)


def test_kernel_matrix_attribute_stays_the_function():
    """``nk.kernel_matrix`` is the function (its module is ntkit.kernel_matrix), also after
    the package has been imported by name."""
    module = importlib.import_module("ntkit.kernel_matrix")
    assert callable(nk.kernel_matrix) and not isinstance(nk.kernel_matrix, types.ModuleType)
    assert nk.kernel_matrix is module.kernel_matrix
    from ntkit.kernel_matrix import TileDone, kernel_matrix, write_kernel_matrix

    assert (TileDone, kernel_matrix, write_kernel_matrix) == (
        nk.TileDone, nk.kernel_matrix, nk.write_kernel_matrix)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        nk.no_such_thing  # noqa: B018
    assert not hasattr(nk, "theory_of_everything")


def test_import_ntkit_stays_light():
    """A fresh ``import ntkit`` loads none of the heavy optional dependencies and none of
    the submodules that are imported on demand; touching ``nk.predict`` loads it."""
    heavy = ["sklearn", "matplotlib", "dask", "distributed", "zarr", "ntkit.predict",
             "ntkit.solvers", "ntkit.sklearn", "ntkit.plot", "ntkit.cli", "ntkit.demo"]
    code = (
        "import sys, ntkit as nk\n"
        f"heavy = {heavy!r}\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "nk.predict\n"
        "print('ntkit.predict' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0] == "[]", out[0]
    assert out[1] == "True"
