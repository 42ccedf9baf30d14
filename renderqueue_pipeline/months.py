"""Months in UTC: the one parser of "YYYY-MM" and the one month range.

Every `--month`, Dagster monthly partition key and budget month goes through
`parse_month`, so one rule decides what a month is (0001-01..9998-12, as a date can hold
the month after it) and one message says what was wrong.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from renderqueue_pipeline.errors import RenderqueueError

#: '2026-03', or '2026-03-01' (a Dagster monthly partition key).
_MONTH = re.compile(r"^(\d{4})-(\d{2})(?:-01)?$")
#: Months a date can hold with its successor (the end of a month range): 0001-01..9998-12.
FIRST_YEAR, LAST_YEAR = 1, 9998


class MonthError(RenderqueueError, ValueError):
    """A month that cannot be used; names the setting it came from."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {reason}")


def month_problem(year: int, month: int) -> str | None:
    """Why YYYY-MM is not a usable month, or None."""
    if not 1 <= month <= 12:
        return "month must be 01-12"
    if not FIRST_YEAR <= year <= LAST_YEAR:
        return f"year must be {FIRST_YEAR:04d}-{LAST_YEAR}"
    return None


def parse_month(text: str | date, setting: str = "--month") -> date:
    """'2026-03', '2026-03-01' or a date -> date(2026, 3, 1); else `MonthError(setting)`."""
    if isinstance(text, date):
        return text.replace(day=1)
    match = _MONTH.match(text.strip())
    if not match:
        raise MonthError(setting, f"expected YYYY-MM, e.g. 2026-03 (got {text!r})")
    year, month = int(match.group(1)), int(match.group(2))
    problem = month_problem(year, month)
    if problem:
        raise MonthError(setting, f"expected YYYY-MM: {problem} (got {text!r})")
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


def month_label(month: date) -> str:
    return f"{month:%Y-%m}"
