"""The type check's set-up stays as written: pyright (basic) over the package in `make test`,
ignores that name their rule, the helper for a row that must exist, and the fal seam's
Protocols matching the gateway they describe (pyright checks the rest in `make typecheck`)."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import psycopg
import pytest

from renderqueue_pipeline.db import LedgerConnection, NoRowError, one_row
from renderqueue_pipeline.fal_gateway import FalCanceller, FalGateway, FalSubmitter

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "renderqueue_pipeline"


def _make_rule(name: str) -> tuple[list[str], list[str]]:
    """(prerequisites, recipe lines) of one Makefile rule."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{name}:"))
    prerequisites = lines[start].split(":", 1)[1].split()
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return prerequisites, recipe


def test_make_test_type_checks_the_package_after_lint() -> None:
    prerequisites, _ = _make_rule("test")
    assert "typecheck" in prerequisites
    assert prerequisites.index("lint") < prerequisites.index("typecheck")
    _, recipe = _make_rule("typecheck")
    assert any(line.startswith("$(BIN)/pyright") for line in recipe)
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pyright"]
    assert config["typeCheckingMode"] == "basic"
    assert config["include"] == ["renderqueue_pipeline"]
    assert config["pythonVersion"] == "3.11"
    assert config["enableTypeIgnoreComments"] is False  # only `pyright: ignore[rule]` counts


def test_every_type_check_ignore_in_the_package_names_its_rule() -> None:
    unnamed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            if re.search(r"#\s*type:\s*ignore", line):
                unnamed.append(f"{where}: `# type: ignore` (pyright does not honour it here)")
            for match in re.finditer(r"#\s*pyright:\s*(\S+)", line):
                if not re.fullmatch(r"ignore\[\w+(,\s*\w+)*\]", match.group(1)):
                    unnamed.append(f"{where}: `{match.group(0)}` (name the rule)")
    assert unnamed == []


def test_one_row_returns_the_row_or_names_its_absence(conn: LedgerConnection) -> None:
    assert one_row(conn.execute("select 1 as one"))["one"] == 1
    with pytest.raises(NoRowError, match="returned no row"):
        one_row(conn.execute("select 1 as one where false"))


def test_one_row_reads_tuple_rows_too(ledger_url: str) -> None:
    with psycopg.connect(ledger_url) as plain:
        assert one_row(plain.execute("select 1, 2")) == (1, 2)


@pytest.mark.parametrize("protocol", [FalSubmitter, FalCanceller])
def test_the_fal_seam_protocols_describe_the_gateway(protocol: type) -> None:
    """Each method a caller relies on exists on FalGateway with the same parameters."""
    members = [
        name
        for name, value in vars(protocol).items()
        if inspect.isfunction(value) and (not name.startswith("_") or name.startswith("__a"))
    ]
    assert members
    for name in members:
        wanted = inspect.signature(getattr(protocol, name)).parameters
        real = inspect.signature(getattr(FalGateway, name)).parameters
        assert list(real) == list(wanted), name
        for parameter in wanted:
            assert real[parameter].kind == wanted[parameter].kind, (name, parameter)
            assert real[parameter].default == wanted[parameter].default, (name, parameter)
