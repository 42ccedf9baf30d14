"""Months and days in UTC: what a report partition covers.

A generation belongs to the UTC day and month of its `created_at`, whenever it finishes.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.months import (
    MonthError,
    month_label,
    month_problem,
    month_range,
    next_month,
    parse_month,
    previous_month,
    start_of,
)

# The month helpers live in renderqueue_pipeline/months.py (one parser for every --month);
# re-exported here for the report modules.
__all__ = [
    "FINALIZE_GRACE",
    "SETTLE_AFTER",
    "MonthError",
    "ReportInputError",
    "days_until",
    "finalizes_at",
    "month_label",
    "month_problem",
    "month_range",
    "next_month",
    "parse_month",
    "previous_month",
    "start_of",
]

# The previous month is finalized this long after it ends (06:00 UTC on the 1st): time for
# late webhooks and the reconciler to land its last completions.
FINALIZE_GRACE = timedelta(hours=6)
# A day whose rollup had no open generation, computed this long after the day ended, is
# settled: later refreshes of the month reuse it (unless a new row or event touches it)
# instead of reading its generations again.
SETTLE_AFTER = timedelta(hours=1)


class ReportInputError(RenderqueueError, ValueError):
    """An option the reports cannot use (the message says which and why)."""


def finalizes_at(month: date) -> datetime:
    """When the month's figures become final: the grace period after it ends."""
    return start_of(next_month(month)) + FINALIZE_GRACE


def days_until(month: date, now: datetime) -> list[date]:
    """Days of the month that have begun by `now` (all of them for a past month)."""
    first, end = month, next_month(month)
    last = min(end - timedelta(days=1), now.astimezone(UTC).date())
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]
