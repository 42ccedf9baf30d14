"""The month's FinOps FOCUS export: one cost row per completed generation, summing to the
report tables' cost, in the report files and from `renderqueue report --format focus`."""

from __future__ import annotations

import io
import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pandas as pd
import psycopg
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from report_helpers import (
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
from renderqueue_pipeline.reports.focus import FOCUS_COLUMNS
from renderqueue_pipeline.reports.spend import refresh_month
from renderqueue_pipeline.reports.storage import export_month

MARCH = date(2026, 3, 1)
AFTER_MARCH = utc(2026, 4, 2, 12)
#: What the issue asks every FOCUS row to carry, at least.
REQUIRED = (
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "BillingCurrency",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "ChargeCategory",
    "ServiceName",
    "ResourceId",
    "ResourceType",
    "ConsumedQuantity",
    "ConsumedUnit",
    "PricingUnit",
    "Tags",
)


@pytest.fixture
def march(conn: psycopg.Connection) -> dict[str, dict]:
    """March 2026: three completed generations (one billed by fal at another figure, one from
    a batch, one at the month's last instant), a failed and an open one, and April's first."""
    batch = add_batch(conn, "file:///inbox/march.csv")
    item = add_item(conn, batch, 5 * KLING_MICROS_PER_SECOND)
    rows = {
        "batch": add_generation(
            conn,
            created_at=utc(2026, 3, 1),
            status="completed",
            user_id=1,
            seconds=5,
            cost_micros=5 * KLING_MICROS_PER_SECOND,
            batch_item_id=item,
        ),
        "billed": add_generation(
            conn,
            created_at=utc(2026, 3, 10, 8, 30),
            status="completed",
            user_id=2,
            endpoint=VEO,
            seconds=8,
            cost_micros=8 * VEO_MICROS_PER_SECOND,
        ),
        "last_instant": add_generation(
            conn,
            created_at=utc(2026, 3, 31, 23, 59, 59, 999000),
            status="completed",
            user_id=3,
            seconds=Decimal("4.5"),
            cost_micros=630_001,  # an odd micro-dollar: exact to the last digit
        ),
    }
    add_generation(conn, created_at=utc(2026, 3, 2), status="failed", user_id=1)
    add_generation(conn, created_at=utc(2026, 3, 3), status="in_progress", user_id=1)
    add_generation(conn, created_at=utc(2026, 4, 1), status="completed", user_id=1, cost_micros=99)
    # fal billed the Veo clip for 7.5 s: the ledger's cost is fal's, ours stays beside it
    conn.execute(
        "update generations set computed_cost_micros = cost_micros, computed_cost_basis ="
        " cost_basis, cost_micros = 3_000_000, fal_billed_micros = 3_000_000,"
        " cost_basis = 'billed' where request_id = %s",
        (rows["billed"],),
    )
    conn.commit()
    return {
        name: conn.execute(
            "select * from generations where request_id = %s", (request_id,)
        ).fetchone()
        for name, request_id in rows.items()
    }


def report_cost(conn: psycopg.Connection) -> int:
    refresh_month(conn, MARCH, now=AFTER_MARCH)
    conn.commit()
    by_user = sum(r["cost_micros"] for r in table(conn, "spend_monthly_by_user", MARCH))
    by_endpoint = sum(r["cost_micros"] for r in table(conn, "spend_monthly_by_endpoint", MARCH))
    assert by_user == by_endpoint
    return by_user


def micros(value: Decimal) -> int:
    return int(value * 1_000_000)


def test_focus_files_carry_one_row_per_completed_generation_summing_to_the_report(
    conn: psycopg.Connection, march: dict[str, dict], tmp_path: Path
) -> None:
    cost = report_cost(conn)
    written = export_month(conn, MARCH, tmp_path.as_uri())
    names = {f.name: f for f in written}
    assert {"focus.csv", "focus.parquet"} <= set(names)
    assert names["focus.parquet"].rows == 3

    folder = tmp_path / "reports" / "spend" / "2026-03"
    arrow = pq.read_table(folder / "focus.parquet")
    assert set(REQUIRED) <= set(arrow.column_names)
    assert tuple(arrow.column_names) == FOCUS_COLUMNS
    assert str(arrow.schema.field("BilledCost").type) == "decimal128(38, 6)"
    rows = {r["ResourceId"]: r for r in arrow.to_pylist()}
    assert set(rows) == {g["request_id"] for g in march.values()}

    # the FOCUS BilledCost sums to the report tables' cost, to the micro-dollar
    assert sum(micros(r["BilledCost"]) for r in rows.values()) == cost
    assert cost == 5 * KLING_MICROS_PER_SECOND + 3_000_000 + 630_001

    billed = rows[march["billed"]["request_id"]]
    assert billed["BilledCost"] == Decimal("3.000000")  # fal's figure
    assert billed["ListCost"] == Decimal("3.200000")  # ours: 8 s at $0.40
    assert billed["x_CostBasis"] == "billed"
    assert billed["x_FalBilledCost"] == Decimal("3.000000")
    assert billed["ResourceType"] == VEO
    assert billed["ConsumedQuantity"] == Decimal("8")
    assert billed["ConsumedUnit"] == "Second"
    assert billed["ListUnitPrice"] == Decimal("0.400000")
    assert json.loads(billed["Tags"]) == {"user": "2"}

    from_batch = rows[march["batch"]["request_id"]]
    assert json.loads(from_batch["Tags"]) == {
        "user": "1",
        "batch": str(table_batch_id(conn, march["batch"])),
    }
    last = rows[march["last_instant"]["request_id"]]
    assert last["BilledCost"] == Decimal("0.630001")
    assert last["ChargePeriodStart"] == datetime(2026, 3, 31, 23, 59, 59, 999000, tzinfo=UTC)
    for r in rows.values():
        assert r["BillingCurrency"] == "USD"
        assert r["ChargeCategory"] == "Usage"
        assert r["ServiceName"] == "fal"
        assert r["BillingPeriodStart"] == datetime(2026, 3, 1, tzinfo=UTC)
        assert r["BillingPeriodEnd"] == datetime(2026, 4, 1, tzinfo=UTC)
        assert r["ChargePeriodEnd"] >= r["ChargePeriodStart"]

    # the CSV holds the same rows, money as exact decimal text
    csv = pd.read_csv(folder / "focus.csv", dtype=str)
    assert tuple(csv.columns) == FOCUS_COLUMNS
    assert sum(micros(Decimal(v)) for v in csv["BilledCost"]) == cost
    assert set(csv["BilledCost"]) == {"0.700000", "3.000000", "0.630001"}
    assert "2026-03-31T23:59:59.999000Z" in set(csv["ChargePeriodStart"])


def table_batch_id(conn: psycopg.Connection, generation: dict) -> int:
    return conn.execute(
        "select batch_id from batch_items where id = %s", (generation["batch_item_id"],)
    ).fetchone()["batch_id"]


def test_report_format_focus_prints_the_same_csv_as_the_file(
    ledger_env, conn: psycopg.Connection, march: dict[str, dict], tmp_path: Path
) -> None:
    export_month(conn, MARCH, tmp_path.as_uri())
    printed = CliRunner().invoke(main, ["report", "--month", "2026-03", "--format", "focus"])
    assert printed.exit_code == 0, printed.output
    on_disk = (tmp_path / "reports" / "spend" / "2026-03" / "focus.csv").read_text()
    assert printed.output == on_disk
    frame = pd.read_csv(io.StringIO(printed.output))
    assert len(frame) == 3


def test_a_month_with_no_completed_generation_exports_a_header_only(
    conn: psycopg.Connection, tmp_path: Path
) -> None:
    written = {f.name: f for f in export_month(conn, MARCH, tmp_path.as_uri())}
    assert written["focus.parquet"].rows == 0
    header = (tmp_path / "reports" / "spend" / "2026-03" / "focus.csv").read_text()
    assert header.strip().split(",") == list(FOCUS_COLUMNS)
