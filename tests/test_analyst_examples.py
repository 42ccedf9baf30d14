"""What docs/reports.md promises analysts: the views agree with the report tables, the
analyst role may read them, and the pandas and DuckDB examples run on the files the report
job wrote."""

from __future__ import annotations

import contextlib
import io
import re
from datetime import date
from pathlib import Path

import psycopg
import pytest
from report_helpers import (
    KLING,
    KLING_MICROS_PER_SECOND,
    VEO,
    VEO_MICROS_PER_SECOND,
    add_generation,
    table,
    utc,
)

from renderqueue_pipeline.reports.spend import refresh_month
from renderqueue_pipeline.reports.storage import export_month

DOC = (Path(__file__).resolve().parent.parent / "docs" / "reports.md").read_text()
MARCH = date(2026, 3, 1)


def doc_python_examples() -> list[str]:
    """The python blocks of "Reading the files" in docs/reports.md."""
    section = DOC.split("### Reading the files", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def doc_sql_examples() -> list[str]:
    section = DOC.split("### Views for analysts", 1)[1].split("### Reading the files", 1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", section, flags=re.S)
    return [s.strip() for b in blocks for s in b.split(";") if s.strip()]


@pytest.fixture
def march(conn: psycopg.Connection) -> None:
    rows = [
        (1, KLING, "completed", 5, utc(2026, 3, 1)),
        (1, KLING, "failed", 5, utc(2026, 3, 2)),
        (2, VEO, "completed", 8, utc(2026, 3, 31, 23, 59, 59, 999000)),
        (2, VEO, "in_progress", 8, utc(2026, 3, 30)),
        (3, VEO, "completed", 4, utc(2026, 4, 1)),  # April
    ]
    price = {KLING: KLING_MICROS_PER_SECOND, VEO: VEO_MICROS_PER_SECOND}
    for user, endpoint, status, seconds, created in rows:
        add_generation(
            conn,
            created_at=created,
            status=status,
            user_id=user,
            endpoint=endpoint,
            seconds=seconds,
            cost_micros=seconds * price[endpoint] if status != "failed" else 0,
        )
    conn.commit()
    refresh_month(conn, MARCH, now=utc(2026, 4, 2, 12))
    conn.commit()


FIGURES = ("generations", "completed", "failed", "canceled", "open", "cost_micros")


def test_the_views_equal_the_closed_months_report_tables(
    conn: psycopg.Connection, march: None
) -> None:
    for view, report, key in (
        ("spend_by_user_month", "spend_monthly_by_user", "user_id"),
        ("spend_by_endpoint_month", "spend_monthly_by_endpoint", "endpoint"),
    ):
        live = conn.execute(f"select * from {view} where month = %s", (MARCH,)).fetchall()  # noqa: S608
        settled = table(conn, report, MARCH)
        assert {r[key]: {f: r[f] for f in FIGURES} for r in live} == {
            r[key]: {f: r[f] for f in FIGURES} for r in settled
        }
        for r in live:
            assert r["cost_usd"] * 1_000_000 == r["cost_micros"]


def test_the_analyst_role_reads_the_views_and_the_docs_queries_run(
    conn: psycopg.Connection, march: None
) -> None:
    conn.execute("set role renderqueue_analyst")
    try:
        users = conn.execute(
            "select user_id, cost_micros from spend_by_user_month where month = %s"
            " order by user_id",
            (MARCH,),
        ).fetchall()
        assert [(r["user_id"], r["cost_micros"]) for r in users] == [
            (1, 5 * KLING_MICROS_PER_SECOND),
            (2, 8 * VEO_MICROS_PER_SECOND),
        ]
        assert conn.execute("select count(*) as n from billing_differences").fetchone()["n"] == 0
        statements = doc_sql_examples()
        assert len(statements) == 2
        for statement in statements:
            conn.execute(statement).fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select inputs from generations")
    finally:
        conn.rollback()


def test_the_docs_pandas_and_duckdb_examples_run_on_the_report_files(
    conn: psycopg.Connection, march: None, tmp_path: Path
) -> None:
    export_month(conn, MARCH, tmp_path.as_uri())
    folder = tmp_path / "reports" / "spend" / "2026-03"
    examples = doc_python_examples()
    assert len(examples) == 2
    assert "duckdb" in examples[1]
    results = []
    for code in examples:
        code = code.replace('"reports/spend/2026-11"', repr(str(folder)))
        printed = io.StringIO()
        namespace: dict = {}
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "docs/reports.md", "exec"), namespace)  # noqa: S102
        results.append((namespace, printed.getvalue()))
    top = results[0][0]["top"]
    assert top["user_id"].tolist() == [2, 1]
    assert top["cost_usd"].tolist() == [3.2, 0.7]
    daily = results[1][0]["daily"]
    assert round(daily["usd"].sum(), 6) == 3.9
    assert "3.2" in results[0][1]
