"""pyproject's dependencies are exactly what the package needs: each import declared once.

An import of an undeclared distribution works here only because something else pulled it
in; a `pip install` of the wheel on another day (or with another resolver) breaks.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "renderqueue_pipeline"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

#: Declared and needed at run time, though no module of ours imports them by name.
RUNTIME_ONLY = {
    "dagster-webserver": "the Dagster UI `renderqueue dev` runs",
    "dagster-dg-cli": "the `dg` command (dg check defs, dg dev)",
    "dagster-postgres": "Dagster's run/event/schedule storage (dagster_home.py's dagster.yaml)",
    "psycopg2-binary": "dagster-postgres' driver (sqlalchemy_url(driver='psycopg2'))",
    "sqlalchemy": "dagster-postgres' engine; our URLs are written for its range",
    "s3fs": "fsspec's s3:// backend (storage and inbox URLs)",
    "httptools": "uvicorn's HTTP parser for the receiver (webhook/limits.py guards it)",
    "sniffio": "httpcore imports it per request; missing, it scans sys.path each time",
}
#: Modules that are developer tools, run from a checkout with the test extra installed.
TEST_EXTRA_USERS = {"chaos.py"}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def _imports(path: Path) -> set[str]:
    """Top-level third-party modules a file imports (at module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != PACKAGE.name}


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # a scan of every installed dist


def _distributions(module: str) -> set[str]:
    names = _installed().get(module, [])
    return {re.sub(r"[-_.]+", "-", n).lower() for n in names}


def test_no_dependency_is_declared_twice() -> None:
    for group in [PROJECT["dependencies"], *PROJECT["optional-dependencies"].values()]:
        names = [_name(r) for r in group]
        assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_every_import_of_the_package_is_a_declared_dependency() -> None:
    runtime = {_name(r) for r in PROJECT["dependencies"]}
    test_extra = {_name(r) for r in PROJECT["optional-dependencies"]["test"]}
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        allowed = runtime | (test_extra if path.name in TEST_EXTRA_USERS else set())
        for module in sorted(_imports(path)):
            distributions = _distributions(module)
            assert distributions, f"{path.relative_to(REPO)}: {module} is not installed"
            if not distributions & allowed:
                missing.append(f"{path.relative_to(REPO)}: {module} ({', '.join(distributions)})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)


def test_every_declared_dependency_is_imported_or_says_why_it_is_there() -> None:
    imported = set()
    for path in PACKAGE.rglob("*.py"):
        for module in _imports(path):
            imported |= _distributions(module)
    unused = {_name(r) for r in PROJECT["dependencies"]} - imported - set(RUNTIME_ONLY)
    assert not unused, f"declared, never imported, no reason in RUNTIME_ONLY: {sorted(unused)}"
    stale = set(RUNTIME_ONLY) - {_name(r) for r in PROJECT["dependencies"]}
    assert not stale, f"RUNTIME_ONLY names what is no longer declared: {sorted(stale)}"
