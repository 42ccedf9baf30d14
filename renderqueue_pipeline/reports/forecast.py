"""Month-end forecast: month-to-date spend plus the last 7 days' daily rate for the time left.

Spend is what the monthly reports count (completed generations' cost_micros by UTC
created_at), so on the month's last moment the forecast equals the report's figure. Open
generations' estimates are shown beside it but not forecast: the rate already carries the
recent pace, and counting estimates too would count a generation twice once it completes.
Everything is computed for an explicit `now` (default: the ledger's `rq_now()`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from renderqueue_pipeline.db import LedgerConnection, one_row
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.money import dollars
from renderqueue_pipeline.reports.checks import snapshot
from renderqueue_pipeline.reports.months import (
    ReportInputError,
    month_label,
    month_range,
    parse_month,
)

RATE_WINDOW = timedelta(days=7)
_WINDOW_US = RATE_WINDOW // timedelta(microseconds=1)


@dataclass
class ForecastRow:
    """One user's or endpoint's figures, in micro-dollars."""

    key: int | str
    month_to_date_micros: int = 0
    last_7_days_micros: int = 0
    in_flight_micros: int = 0
    projected_rest_micros: int = 0
    budget_micros: int | None = None

    @property
    def forecast_micros(self) -> int:
        return self.month_to_date_micros + self.projected_rest_micros

    @property
    def daily_rate_micros(self) -> int:
        """The last 7 days' spend per day, rounded to a micro-dollar (display only)."""
        return (self.last_7_days_micros * 2 + 7) // 14

    @property
    def over_budget(self) -> bool:
        return self.budget_micros is not None and self.forecast_micros > self.budget_micros


@dataclass
class Forecast:
    month: date
    as_of: datetime
    days_left: float
    by_user: list[ForecastRow] = field(default_factory=list)
    by_endpoint: list[ForecastRow] = field(default_factory=list)

    @property
    def forecast_micros(self) -> int:
        return sum(r.forecast_micros for r in self.by_user)

    @property
    def month_to_date_micros(self) -> int:
        return sum(r.month_to_date_micros for r in self.by_user)

    @property
    def over_budget(self) -> list[ForecastRow]:
        return [r for r in self.by_user if r.over_budget]


def projected(last_7_days_micros: int, left: timedelta) -> int:
    """The 7-day rate over `left`, rounded half up to a micro-dollar (integers, exact)."""
    left_us = left // timedelta(microseconds=1)
    return (last_7_days_micros * left_us * 2 + _WINDOW_US) // (2 * _WINDOW_US)


def ledger_now(conn: LedgerConnection) -> datetime:
    """The ledger's clock, rq_now() (the invariant tests may set it)."""
    return one_row(conn.execute(q("forecast_clock")))["now"]


def forecast_month(
    conn: LedgerConnection,
    month: date | str | None = None,
    *,
    now: datetime | None = None,
    default_budget_micros: int | None = None,
) -> Forecast:
    """The month's forecast as of `now` (default: rq_now()); month defaults to now's month.

    A past month is "forecast" at its end: nothing left, the figure is the month's spend.
    Users without a budget row for the month get `default_budget_micros` (None: no budget).
    """
    with snapshot(conn):
        now = (now or ledger_now(conn)).astimezone(UTC)
        month = parse_month(month if month is not None else now.date())
        start, end = month_range(month)
        if now < start:
            raise ReportInputError(
                f"--month: {month_label(month)} has not begun (now is {now:%Y-%m-%d %H:%M} UTC)"
            )
        as_of = min(now, end)
        facts = conn.execute(
            q("forecast_facts"),
            {"start": start, "rate_start": as_of - RATE_WINDOW, "now": as_of},
        ).fetchall()
        budgets = {
            r["user_id"]: int(r["limit_micros"])
            for r in conn.execute(q("forecast_budgets"), {"month": month})
        }
    left = end - as_of
    users: dict[int, ForecastRow] = {u: ForecastRow(u) for u in budgets}
    endpoints: dict[str, ForecastRow] = {}
    for f in facts:
        for rows, key in ((users, f["user_id"]), (endpoints, f["endpoint"])):
            row = rows.setdefault(key, ForecastRow(key))
            row.month_to_date_micros += int(f["month_to_date_micros"])
            row.last_7_days_micros += int(f["last_7_days_micros"])
            row.in_flight_micros += int(f["in_flight_micros"])
    for row in (*users.values(), *endpoints.values()):
        row.projected_rest_micros = projected(row.last_7_days_micros, left)
    for user_id, row in users.items():
        row.budget_micros = budgets.get(user_id, default_budget_micros)

    def order(rows: dict) -> list[ForecastRow]:
        return sorted(rows.values(), key=lambda r: (-r.forecast_micros, str(r.key)))

    return Forecast(
        month=month,
        as_of=as_of,
        days_left=left / timedelta(days=1),
        by_user=order(users),
        by_endpoint=order(endpoints),
    )


def _money(micros: int | None) -> str:
    return "-" if micros is None else dollars(micros)


def markdown(forecast: Forecast, by: str = "user") -> str:
    """The forecast by user (with budgets) or by endpoint as a markdown table."""
    rows = forecast.by_user if by == "user" else forecast.by_endpoint
    head = "| user | month to date | last 7 days/day | forecast | budget | over |"
    if by != "user":
        head = "| endpoint | month to date | last 7 days/day | forecast |"
    lines = [head, "|---" + "|---:" * (head.count("|") - 2) + "|"]
    for r in rows:
        cells = [str(r.key), dollars(r.month_to_date_micros), dollars(r.daily_rate_micros)]
        cells.append(dollars(r.forecast_micros))
        if by == "user":
            cells += [_money(r.budget_micros), "yes" if r.over_budget else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
