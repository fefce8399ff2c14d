"""Every public entry point of ntkit joins the adversarial suite.

The entry points are enumerated from the package itself (``ntkit.__all__``, the
``__all__`` of ntkit.predict, ntkit.solvers, ntkit.spec and ntkit.sklearn, and the
commands of the ``ntkit`` command line), so a new public function, class or
command fails `test_every_public_entry_point_is_listed` until it gets a row in
entry_points.py's `ADVERSARIAL_CASES`: hostile-input tests, or a reasoned exemption.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from functools import cache
from pathlib import Path

HERE = Path(__file__).parent
MODULES = ("ntkit", "ntkit.predict", "ntkit.solvers", "ntkit.spec", "ntkit.sklearn")


@cache
def table():
    """entry_points.py of this folder, loaded by path: a conftest.py here would be
    imported as the module "conftest" and shadow tests/conftest.py."""
    spec = importlib.util.spec_from_file_location("ntkit_adversarial_table",
                                                  HERE / "entry_points.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def public_entry_points() -> set[str]:
    """Every callable in the modules' ``__all__`` and every command of ``ntkit``."""
    names = set()
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in module.__all__:
            if callable(getattr(module, attr)):
                names.add(f"{name}.{attr}")
    from ntkit.cli import cli

    names.update(f"ntkit {command}" for command in cli.commands)
    return names


@cache
def defined_tests(file: str) -> frozenset[str]:
    """Names of the test functions (top level or in a class) that ``file`` defines."""
    tree = ast.parse((HERE / file).read_text(encoding="utf-8"))
    return frozenset(node.name for node in ast.walk(tree)
                     if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                     and node.name.startswith("test_"))


def test_every_public_entry_point_is_listed():
    missing = sorted(public_entry_points() - set(table().ADVERSARIAL_CASES))
    assert not missing, (
        f"public entry points with no row in tests/adversarial/entry_points.py's "
        f"ADVERSARIAL_CASES: {missing}; add hostile-input tests for each (shapes, dtypes, "
        f"values, files, ...) and list them, or an Exempt with the reason")


def test_no_row_for_what_is_not_public():
    stale = sorted(set(table().ADVERSARIAL_CASES) - public_entry_points())
    assert not stale, f"rows of ADVERSARIAL_CASES that are no public entry point: {stale}"


def test_every_listed_test_exists():
    """Each ``file::test`` id names a suite file that defines that test function."""
    t = table()
    wrong = []
    for entry, cases in t.ADVERSARIAL_CASES.items():
        if isinstance(cases, t.Exempt | t.Pending):
            continue
        assert isinstance(cases, tuple) and cases, f"{entry}: no test ids"
        for case in cases:
            file, _, name = case.partition("::")
            if file not in t.SUITE_FILES or not (HERE / file).is_file() \
                    or name.split("[")[0] not in defined_tests(file):
                wrong.append(f"{entry}: {case}")
    assert not wrong, f"test ids that do not exist: {wrong}"


def test_exemptions_and_pending_rows_are_reasoned():
    """An exemption says why in a sentence; a pending row names a file of the suite."""
    t = table()
    for entry, cases in t.ADVERSARIAL_CASES.items():
        if isinstance(cases, t.Exempt):
            assert len(cases.reason.split()) >= 8, f"{entry}: {cases.reason!r}"
        if isinstance(cases, t.Pending):
            assert cases.file in t.SUITE_FILES, f"{entry}: {cases.file!r}"


def test_every_suite_file_that_exists_is_named():
    """A test file of this folder that no row names is a table out of date."""
    t = table()
    named = {c.partition("::")[0] for cases in t.ADVERSARIAL_CASES.values()
             if isinstance(cases, tuple) for c in cases}
    named |= {cases.file for cases in t.ADVERSARIAL_CASES.values()
              if isinstance(cases, t.Pending)}
    present = {p.name for p in HERE.glob("test_*.py")} - {Path(__file__).name}
    assert present <= named, f"suite files no row names: {sorted(present - named)}"
    assert set(t.SUITE_FILES) <= named
