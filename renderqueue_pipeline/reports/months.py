"""Months and days in UTC: what a report partition covers.

A generation belongs to the UTC day and month of its `created_at`, whenever it finishes.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from renderqueue_pipeline.errors import RenderqueueError

# The previous month is finalized this long after it ends (06:00 UTC on the 1st): time for
# late webhooks and the reconciler to land its last completions.
FINALIZE_GRACE = timedelta(hours=6)
# A day whose rollup had no open generation, computed this long after the day ended, is
# settled: later refreshes of the month reuse it (unless a new row or event touches it)
# instead of reading its generations again.
SETTLE_AFTER = timedelta(hours=1)

_MONTH = re.compile(r"^(\d{4})-(\d{2})(?:-01)?$")
#: Months a date can hold with its successor (the end of a month range): 0001-01..9998-12.
FIRST_YEAR, LAST_YEAR = 1, 9998


def month_problem(year: int, month: int) -> str | None:
    """Why YYYY-MM is not a usable month, or None (one rule for every --month)."""
    if not 1 <= month <= 12:
        return "month must be 01-12"
    if not FIRST_YEAR <= year <= LAST_YEAR:
        return f"year must be {FIRST_YEAR:04d}-{LAST_YEAR}"
    return None


class ReportInputError(RenderqueueError, ValueError):
    """A month or option the reports cannot use (the message says which and why)."""


def parse_month(text: str | date) -> date:
    """'2026-03', '2026-03-01' (a Dagster partition key) or a date -> date(2026, 3, 1)."""
    if isinstance(text, date):
        return text.replace(day=1)
    match = _MONTH.match(text.strip())
    if not match:
        raise ReportInputError(f"--month: expected YYYY-MM, e.g. 2026-03 (got {text!r})")
    year, month = int(match.group(1)), int(match.group(2))
    problem = month_problem(year, month)
    if problem:
        raise ReportInputError(f"--month: {problem} (got {text!r})")
    return date(year, month, 1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def previous_month(month: date) -> date:
    return (month.replace(day=1) - timedelta(days=1)).replace(day=1)


def start_of(day: date) -> datetime:
    """Midnight UTC at the start of `day`."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def month_range(month: date) -> tuple[datetime, datetime]:
    """[start, end) of the month in UTC."""
    return start_of(month), start_of(next_month(month))


def finalizes_at(month: date) -> datetime:
    """When the month's figures become final: the grace period after it ends."""
    return start_of(next_month(month)) + FINALIZE_GRACE


def days_until(month: date, now: datetime) -> list[date]:
    """Days of the month that have begun by `now` (all of them for a past month)."""
    first, end = month, next_month(month)
    last = min(end - timedelta(days=1), now.astimezone(UTC).date())
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def month_label(month: date) -> str:
    return f"{month:%Y-%m}"
