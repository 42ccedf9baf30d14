"""Closed months the ledger changed after their final report (a late webhook, the billing
reconciliation applying fal's figures, a reconciler completion).

The report tables of such a month are stale until the month is refreshed; the sensor in
defs/reports/late_changes.py asks for that refresh, and the refresh's blocking
`report_*_matches_ledger` checks then prove the tables equal the ledger again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

import psycopg

from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.reports.months import month_range, parse_month, previous_month
from renderqueue_pipeline.reports.spend import ID_OVERLAP, IN_FLIGHT

#: Closed months watched: the previous two. Late changes land within days of a month's
#: end (billing is reconciled 3 days back); older months are refreshed by hand.
WATCHED_MONTHS = 2


@dataclass(frozen=True)
class LateChange:
    month: date
    report_snapshot_at: datetime  # which report the change is late for (one refresh each)
    days: list[date]


def watched_months(now: datetime) -> list[date]:
    """The closed months a late change is looked for in, newest first."""
    month = parse_month(now.astimezone(UTC).date())
    months = []
    for _ in range(WATCHED_MONTHS):
        month = previous_month(month)
        months.append(month)
    return months


def late_changes(conn: psycopg.Connection, now: datetime | None = None) -> list[LateChange]:
    """Finalized months among the watched ones with ledger changes after their report
    (`now` decides which months are watched; default: the ledger's rq_now())."""
    from renderqueue_pipeline.reports.forecast import ledger_now

    now = now or ledger_now(conn)
    found = []
    for month in watched_months(now):
        mark = conn.execute(q("closed_month_high_water"), {"month": month}).fetchone()
        if mark is None:  # not finalized yet: the finalize run reads everything anyway
            continue
        start, end = month_range(month)
        touched = conn.execute(
            q("days_touched_since"),
            {
                "after_generation_id": mark["max_generation_id"],
                "after_event_id": mark["max_event_id"],
                "since": mark["snapshot_at"] - IN_FLIGHT,
                "overlap": ID_OVERLAP,
                "start": start,
                "end": end,
            },
        ).fetchall()
        if touched:
            days = sorted(r["day"] for r in touched)
            found.append(LateChange(month, mark["report_snapshot_at"], days))
    conn.commit()
    return found
