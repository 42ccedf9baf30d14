"""`renderqueue report`: the month's figures from the ledger, equal to the report tables."""

from __future__ import annotations

import csv
import io
import json
from datetime import date
from decimal import Decimal

import psycopg
import pytest
from click.testing import CliRunner
from report_helpers import (
    KLING,
    KLING_MICROS_PER_SECOND,
    VEO,
    VEO_MICROS_PER_SECOND,
    add_batch,
    add_generation,
    add_item,
    table,
    utc,
)

from renderqueue_pipeline.cli import main
from renderqueue_pipeline.reports.spend import refresh_month

MARCH = date(2026, 3, 1)


@pytest.fixture
def march(conn: psycopg.Connection) -> int:
    batch = add_batch(conn, "file:///inbox/march.csv")
    rows = [
        (1, KLING, "completed", 5, utc(2026, 3, 1), batch),
        (1, KLING, "failed", 5, utc(2026, 3, 2), batch),
        (2, VEO, "completed", 8, utc(2026, 3, 31, 23, 59, 59, 999000), None),
        (2, VEO, "in_progress", 8, utc(2026, 3, 30), None),
        (3, VEO, "completed", 4, utc(2026, 4, 1), None),  # April
    ]
    price = {KLING: KLING_MICROS_PER_SECOND, VEO: VEO_MICROS_PER_SECOND}
    for user, endpoint, status, seconds, created, batch_id in rows:
        item = add_item(conn, batch_id, seconds * price[endpoint])
        add_generation(
            conn,
            created_at=created,
            status=status,
            user_id=user,
            endpoint=endpoint,
            seconds=seconds,
            cost_micros=seconds * price[endpoint],
            batch_item_id=item,
        )
    conn.commit()
    return 5 * KLING_MICROS_PER_SECOND + 8 * VEO_MICROS_PER_SECOND


def run(*args: str):
    return CliRunner().invoke(main, ["report", *args])


def _plain(rows: list[dict], columns: list[str]) -> list[dict]:
    out = []
    for r in rows:
        out.append({c: (str(r[c]) if isinstance(r[c], Decimal) else r[c]) for c in columns})
    return out


def test_report_works_before_any_materialization(ledger_env, march: int) -> None:
    result = run("--month", "2026-03", "--by", "user", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = {r["user_id"]: r for r in json.loads(result.output)}
    assert set(rows) == {1, 2}
    assert rows[1]["cost_micros"] == 5 * KLING_MICROS_PER_SECOND
    assert (rows[1]["completed"], rows[1]["failed"]) == (1, 1)
    assert rows[2]["open_estimate_micros"] == 8 * VEO_MICROS_PER_SECOND
    assert sum(r["cost_micros"] for r in rows.values()) == march
    table_out = run("--month", "2026-03")
    assert table_out.exit_code == 0
    assert "$3.900000" in table_out.output  # 0.70 + 3.20, to the micro-dollar
    # nothing billed by fal yet: its columns say so, they do not show zero
    assert "fal billed" in table_out.output
    assert "fal − ours" in table_out.output


@pytest.mark.parametrize("by", ["user", "endpoint", "batch"])
def test_report_prints_the_same_numbers_as_the_tables(
    ledger_env, conn: psycopg.Connection, march: int, by: str
) -> None:
    refresh_month(conn, MARCH, now=utc(2026, 4, 2))
    name = {
        "user": "spend_monthly_by_user",
        "endpoint": "spend_monthly_by_endpoint",
        "batch": "spend_monthly_by_batch",
    }[by]
    result = run("--month", "2026-03", "--by", by, "--format", "json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    columns = list(printed[0])
    key = columns[0]
    stored = sorted(_plain(table(conn, name, MARCH), columns), key=lambda r: str(r[key]))
    assert sorted(printed, key=lambda r: str(r[key])) == stored
    as_csv = list(
        csv.DictReader(io.StringIO(run("--month", "2026-03", "--by", by, "--format", "csv").output))
    )
    assert [r["cost_micros"] for r in as_csv] == [str(r["cost_micros"]) for r in printed]


def test_bad_month_is_one_line(ledger_env) -> None:
    result = run("--month", "2026/03")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "renderqueue: --month: expected YYYY-MM, e.g. 2026-03 (got '2026/03')"
    )
