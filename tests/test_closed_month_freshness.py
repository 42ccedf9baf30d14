"""A finalized month is refreshed after a late change: the sensor sees the change, asks for
one refresh of that month, and stays quiet once the refreshed tables hold it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from urllib.parse import quote

import dagster as dg
import psycopg
import pytest
from report_helpers import KLING, KLING_MICROS_PER_SECOND, add_generation, table, utc

from renderqueue_pipeline.dagster_home import dagster_storage_url
from renderqueue_pipeline.defs.reports.late_changes import closed_month_late_change_sensor
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.reports.late_changes import late_changes
from renderqueue_pipeline.reports.spend import refresh_month

MARCH = date(2026, 3, 1)
APRIL_10 = utc(2026, 4, 10)


@pytest.fixture
def instance(ledger_url: str) -> Iterator[dg.DagsterInstance]:
    storage = dagster_storage_url(ledger_url)
    with dg.instance_for_test(
        overrides={"storage": {"postgres": {"postgres_url": storage}}}
    ) as inst:
        yield inst


@pytest.fixture
def finalized_march(conn: psycopg.Connection) -> psycopg.Connection:
    for day in (2, 15):
        add_generation(
            conn,
            created_at=utc(2026, 3, day),
            status="completed",
            seconds=5,
            cost_micros=5 * KLING_MICROS_PER_SECOND,
            endpoint=KLING,
        )
    conn.commit()
    report = refresh_month(conn, MARCH, now=utc(2026, 4, 1, 6))
    assert report.state == "final"
    return conn


def sensor_runs(instance: dg.DagsterInstance, ledger_url: str) -> list[dg.RunRequest]:
    clocked = f"{ledger_url}{'&' if '?' in ledger_url else '?'}options=" + quote(
        "-c renderqueue.now=2026-04-10T00:00:00Z"
    )
    context = dg.build_sensor_context(
        instance=instance, resources={"ledger": LedgerDatabase(url=clocked)}
    )
    return list(closed_month_late_change_sensor(context).run_requests or [])


def test_a_finalized_month_without_late_changes_is_left_alone(
    finalized_march: psycopg.Connection, instance: dg.DagsterInstance, ledger_url: str
) -> None:
    assert late_changes(finalized_march, APRIL_10) == []
    assert sensor_runs(instance, ledger_url) == []


def test_a_late_generation_in_a_finalized_month_asks_for_one_refresh_of_that_month(
    finalized_march: psycopg.Connection, instance: dg.DagsterInstance, ledger_url: str
) -> None:
    conn = finalized_march
    add_generation(  # a late webhook's row, after the month was finalized
        conn,
        created_at=utc(2026, 3, 20, 12),
        status="completed",
        seconds=10,
        cost_micros=10 * KLING_MICROS_PER_SECOND,
        endpoint=KLING,
    )
    conn.commit()
    (change,) = late_changes(conn, APRIL_10)
    assert (change.month, change.days) == (MARCH, [date(2026, 3, 20)])
    (run,) = sensor_runs(instance, ledger_url)
    assert run.partition_key == "2026-03-01"
    assert run.tags["renderqueue/late_days"] == "20"
    assert run.run_key.startswith("late:2026-03@")

    assert refresh_month(conn, MARCH, now=APRIL_10).state == "final"  # the requested run
    (row,) = table(conn, "spend_monthly_by_user", MARCH)
    assert row["cost_micros"] == 20 * KLING_MICROS_PER_SECOND
    assert late_changes(conn, APRIL_10) == []
    assert sensor_runs(instance, ledger_url) == []


def test_a_generation_completing_after_finalizing_is_a_late_change(
    finalized_march: psycopg.Connection,
) -> None:
    conn = finalized_march
    add_generation(conn, created_at=utc(2026, 3, 31, 23, 50), status="in_progress")
    conn.commit()
    refresh_month(conn, MARCH, now=utc(2026, 4, 1, 7))  # finalized with it still open
    assert late_changes(conn, APRIL_10) == []
    conn.execute(
        "update generations set status = 'completed', billed_seconds = 5, cost_micros = %s,"
        " finished_at = now(), updated_at = now() where status = 'in_progress'",
        (5 * KLING_MICROS_PER_SECOND,),
    )
    conn.commit()
    (change,) = late_changes(conn, APRIL_10)
    assert change.days == [date(2026, 3, 31)]


def test_months_before_the_watched_ones_are_not_scanned(
    finalized_march: psycopg.Connection,
) -> None:
    add_generation(conn := finalized_march, created_at=utc(2026, 3, 21), status="completed")
    conn.commit()
    assert late_changes(conn, utc(2026, 5, 31))  # March is two months back: watched
    assert late_changes(conn, utc(2026, 6, 1)) == []
