"""Monthly spend reports: refresh a month's rollups and report tables in one transaction.

The report tables are sums over two daily rollups (`spend_rollup_daily`: per UTC day, user
and endpoint; `spend_rollup_daily_batch`: per day and batch). Refreshing an open month
reads from the ledger only the days that can still change: days not yet settled, and days
whose generations were inserted or received an event since they were computed. A month past
its grace period (06:00 UTC on the 1st) is final; the finalizing run (schedules.py) is a
rebuild: every day read again from the ledger, whatever wrote to it.

A month that has ended keeps changing (late webhooks, the reconciler, fal's billing,
raw SQL): triggers record every such change in `spend_report_changes` in the writer's own
transaction (sql/functions/report_changes.sql). Refreshing a changed final month is
always a rebuild, and a rebuild records the changes its snapshot saw; the reports' sensor
(defs/reports/sensors.py) rebuilds changed months. The checks (checks.py) compare the
tables with the ledger afterwards, every key.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import psycopg
from psycopg import IsolationLevel

from renderqueue_pipeline.db import LedgerConnection, one_row
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.ledger import ledger_now
from renderqueue_pipeline.reports.months import (
    SETTLE_AFTER,
    days_until,
    finalizes_at,
    month_range,
    next_month,
)

# Ids handed out to transactions still in flight during a refresh may commit below the
# high-water mark it recorded; the next refresh looks this far back for rows and events
# written within IN_FLIGHT of that refresh's snapshot.
ID_OVERLAP = 10_000
IN_FLIGHT = timedelta(minutes=5)


@dataclass
class MonthReport:
    """What a refresh wrote, and what the checks found in the same snapshot."""

    month: date
    state: str
    computed_at: datetime
    days_recomputed: int
    days_reused: int
    generations: int
    cost_micros: int
    open_estimate_micros: int
    by_user: list[dict]
    by_endpoint: list[dict]
    by_batch: list[dict]
    daily: list[dict]
    #: our own figure for the completed generations; fal's bill for those it billed and
    #: the difference from ours for the same ones (None while none was billed)
    computed_micros: int = 0
    billed_generations: int = 0
    fal_billed_micros: int | None = None
    billed_difference_micros: int | None = None
    #: when the month's ledger last changed after it ended (None: never), and whether a
    #: change committed after this refresh's snapshot is still waiting for a rebuild
    last_changed_at: datetime | None = None
    finalized_at: datetime | None = None
    rebuilt: bool = False
    changes_seen: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def final(self) -> bool:
        return self.state == "final"


def _recompute(conn: LedgerConnection, first: date, end: date) -> None:
    """Replace the rollup of days [first, end) with what the ledger says now."""
    start_ts = datetime(first.year, first.month, first.day, tzinfo=UTC)
    end_ts = datetime(end.year, end.month, end.day, tzinfo=UTC)
    conn.execute(q("rollup_delete_range"), {"first_day": first, "end_day": end})
    conn.execute(q("rollup_batch_delete_range"), {"first_day": first, "end_day": end})
    conn.execute(q("rollup_insert_range"), {"start": start_ts, "end": end_ts})


def _stale_days(
    conn: LedgerConnection, month: date, now: datetime
) -> tuple[list[date], list[date]]:
    """Days of an open month to read again, and the settled days reused as they are."""
    start, end = month_range(month)
    days = days_until(month, now)
    known = {
        r["day"]: r
        for r in conn.execute(
            q("rollup_days_of_month"), {"first_day": month, "end_day": next_month(month)}
        )
    }
    settled = {d: r for d, r in known.items() if r["settled"] and d in days}
    stale = set(days) - set(settled)
    if settled:
        touched = conn.execute(
            q("days_touched_since"),
            {
                "after_generation_id": min(r["max_generation_id"] for r in settled.values()),
                "after_event_id": min(r["max_event_id"] for r in settled.values()),
                "since": min(r["snapshot_at"] for r in settled.values()) - IN_FLIGHT,
                "overlap": ID_OVERLAP,
                "start": start,
                "end": end,
            },
        ).fetchall()
        stale |= {r["day"] for r in touched if r["day"] in settled}
    return sorted(stale), sorted(set(settled) - stale)


def _write_tables(conn: LedgerConnection, month: date, computed_at: datetime) -> None:
    """Replace the month's report rows (every dimension) with sums of its rollups."""
    params = {"month": month, "end_day": next_month(month), "computed_at": computed_at}
    conn.execute(q("report_rows_delete"), params)
    conn.execute(q("report_rows_insert"), params)


def _mark_days(conn: LedgerConnection, days: list[date], now: datetime, high_water: dict) -> None:
    conn.execute(
        q("rollup_days_upsert"),
        {
            "days": days,
            "computed_at": now,
            "settle_before": (now - SETTLE_AFTER).date(),
            **high_water,
        },
    )


def refresh_month(
    conn: LedgerConnection,
    month: date,
    *,
    now: datetime | None = None,
    rebuild: bool = False,
) -> MonthReport:
    """Refresh (or finalize) one month's report tables, in one transaction.

    Reads from the ledger only the days that may have changed since they were computed
    (see module docstring); `rebuild` reads every day. `now` decides the state: from
    `finalizes_at(month)` on the month is 'final', before that 'open'. Safe to run
    concurrently (one refresh of a month at a time) and to repeat: the same ledger gives the
    same rows.
    """
    started = time.perf_counter()
    now = (now or ledger_now(conn)).astimezone(UTC)  # the ledger's clock decides the state
    final = now >= finalizes_at(month)
    lock = (f"spend_report:{month:%Y-%m}",)
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.commit()
    # one refresh of a month at a time, waited for before the snapshot is taken
    conn.execute("select pg_advisory_lock(hashtextextended(%s, 0))", lock)
    conn.commit()
    previous_isolation = conn.isolation_level
    conn.isolation_level = IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            report = _refresh_in_snapshot(conn, month, now, final, rebuild)
        if report.rebuilt and report.changes_seen:
            # after the commit, read committed (a writer may hold the row): a change
            # committed since the snapshot counts higher and keeps the month changed
            conn.isolation_level = previous_isolation
            conn.execute(
                q("report_month_rebuilt"),
                {"month": month, "changes": report.changes_seen, "rebuilt_at": now},
            )
            conn.commit()
    finally:
        conn.isolation_level = previous_isolation
        conn.execute("select pg_advisory_unlock(hashtextextended(%s, 0))", lock)
        conn.commit()
    report.seconds = time.perf_counter() - started
    return report


def _refresh_in_snapshot(
    conn: LedgerConnection,
    month: date,
    now: datetime,
    final: bool,
    rebuild: bool,
) -> MonthReport:
    clock = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - clock
        clock = time.perf_counter()

    high_water = one_row(conn.execute(q("ledger_high_water")))
    changes = conn.execute(q("report_month_changes"), {"month": month}).fetchone()
    # a final month whose ledger changed after it ended is rebuilt, never patched day by day
    rebuild = rebuild or (final and bool(changes and changes["changed"]))
    all_days = days_until(month, now)
    reused: list[date] = []
    if rebuild or not all_days:
        stale = all_days
    else:
        stale, reused = _stale_days(conn, month, now)
    # one statement per day keeps each one small (a day's rows, found by an index scan);
    # the last day also takes any row stamped later in the month (a clock that ran ahead)
    ranges = [(day, day + timedelta(days=1)) for day in stale]
    if not all_days:
        ranges = [(month, next_month(month))]
    elif ranges and ranges[-1][0] == all_days[-1]:
        ranges[-1] = (all_days[-1], next_month(month))
    conn.execute("set local work_mem = '32MB'")  # a day's sort stays in memory
    for first, end in ranges:
        _recompute(conn, first, end)
    lap("rollup")
    _write_tables(conn, month, now)
    lap("tables")
    if stale:
        _mark_days(conn, stale, now, high_water)
    if reused:
        conn.execute(q("rollup_days_advance"), {"days": reused, **high_water})
    state = "final" if final else "open"
    summary = one_row(
        conn.execute(
            q("report_month_upsert"),
            {
                "month": month,
                "end_day": next_month(month),
                "state": state,
                "computed_at": now,
                "snapshot_at": high_water["snapshot_at"],
                "max_generation_id": high_water["max_generation_id"],
            },
        )
    )
    return MonthReport(
        month=month,
        state=state,
        computed_at=now,
        days_recomputed=len(stale),
        days_reused=len(reused),
        generations=int(summary["generations"]),
        cost_micros=int(summary["cost_micros"]),
        open_estimate_micros=int(summary["open_estimate_micros"]),
        by_user=conn.execute(q("monthly_by_user"), {"month": month}).fetchall(),
        by_endpoint=conn.execute(q("monthly_by_endpoint"), {"month": month}).fetchall(),
        by_batch=conn.execute(q("monthly_by_batch"), {"month": month}).fetchall(),
        daily=conn.execute(q("daily_for_month"), {"month": month}).fetchall(),
        computed_micros=int(summary["computed_micros"]),
        billed_generations=int(summary["billed_generations"]),
        fal_billed_micros=summary["fal_billed_micros"],
        billed_difference_micros=summary["billed_difference_micros"],
        last_changed_at=changes["last_changed_at"] if changes else None,
        finalized_at=summary["finalized_at"],
        rebuilt=rebuild,
        changes_seen=int(changes["changes"]) if changes else 0,
        timings=timings,
    )


def changed_months(conn: LedgerConnection) -> list[dict]:
    """Months with a report whose ledger changed since their last rebuild (oldest first):
    what the reports' sensor rebuilds."""
    with conn.transaction():
        return conn.execute(q("report_months_changed")).fetchall()


def mark_days_unsettled(conn: LedgerConnection, days: Iterable[date]) -> None:
    """For writers that change money outside record_events (a raw UPDATE, a billing
    correction): the next refresh of those days' months reads them from the ledger again."""
    conn.execute(q("mark_days_unsettled"), {"days": sorted(set(days))})
