"""Per-user monthly budgets, checked before any money is committed.

A user's budget for a month (UTC) is their `user_budgets` row, else
RENDERQUEUE_DEFAULT_MONTHLY_BUDGET_USD (unset: no cap). A request fits when
spent + in flight + its own estimate stay within the budget of the UTC month in which it
reaches fal. The decision is made once, when the request is sent, by the SQL function
rq_claim_for_send (sql/functions/admission.sql; `ledger.claim_for_send`) under the user's
transaction lock, on every path to fal; this module reads the same figures
(rq_budget_figures) for people.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

from renderqueue_pipeline.db import LedgerConnection, one_row
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.money import MICROS_PER_USD
from renderqueue_pipeline.settings import get_settings

MAX_USD = Decimal(10) ** 9  # a billion dollars: anything above is a typo


class BudgetSettingError(RenderqueueError, ValueError):
    """A money amount that cannot be used; names the setting."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {reason}")


def parse_usd(value: Any, setting: str) -> int:
    """A non-negative dollar amount ("12.5", 12.5, "$12.50") as micro-dollars."""
    if isinstance(value, bool) or value is None:
        raise BudgetSettingError(setting, f"expected an amount in USD, got {value!r}")
    text = str(value).strip().removeprefix("$").replace("_", "")
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise BudgetSettingError(
            setting, f"expected an amount in USD like 25 or 12.50, got {value!r}"
        ) from None
    if not amount.is_finite():
        raise BudgetSettingError(setting, f"must be a finite amount, got {value!r}")
    if amount < 0:
        raise BudgetSettingError(setting, f"must not be negative, got {value!r}")
    if amount > MAX_USD:
        raise BudgetSettingError(setting, f"must be at most {MAX_USD:,} USD, got {value!r}")
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise BudgetSettingError(setting, f"more precise than a micro-dollar: {value!r}")
    return int(micros)


@dataclass(frozen=True)
class MonthFigures:
    """One user's month: the cap in force (None: no cap) and what counts against it."""

    user_id: int
    month: date
    limit_micros: int | None
    limit_source: str  # 'user_budgets', 'default' or 'none'
    actual_micros: int
    in_flight_micros: int

    @property
    def committed_micros(self) -> int:
        return self.actual_micros + self.in_flight_micros

    @property
    def remaining_micros(self) -> int | None:
        return None if self.limit_micros is None else self.limit_micros - self.committed_micros


def month_figures(
    conn: LedgerConnection,
    user_id: int,
    month: date | None = None,
    default_limit_micros: int | None = None,
) -> MonthFigures:
    """The budget figures of one user for a month (None: the current UTC month)."""
    row = one_row(conn.execute(q("user_month_figures"), {"user_id": user_id, "month": month}))
    if row["limit_micros"] is not None:
        limit, source = int(row["limit_micros"]), "user_budgets"
    elif default_limit_micros is not None:
        limit, source = default_limit_micros, "default"
    else:
        limit, source = None, "none"
    return MonthFigures(
        user_id=user_id,
        month=row["month"],
        limit_micros=limit,
        limit_source=source,
        actual_micros=int(row["actual_micros"]),
        in_flight_micros=int(row["in_flight_micros"]),
    )


def default_limit_micros() -> int | None:
    """RENDERQUEUE_DEFAULT_MONTHLY_BUDGET_USD in micro-dollars (None when unset)."""

    value = get_settings().default_monthly_budget_usd
    return None if value is None else parse_usd(value, "RENDERQUEUE_DEFAULT_MONTHLY_BUDGET_USD")


def set_budget(
    conn: LedgerConnection, user_id: int, limit_micros: int, month: date | None = None
) -> dict[str, Any]:
    """Set (or replace) a user's budget for a month (default: the current UTC month)."""
    with conn.transaction():
        if month is None:
            month = one_row(conn.execute(q("current_utc_month")))["month"]
        return one_row(
            conn.execute(
                q("upsert_user_budget"),
                {"user_id": user_id, "month": month, "limit_micros": limit_micros},
            )
        )


def budget_overview(
    conn: LedgerConnection,
    user_id: int | None = None,
    month: date | None = None,
    default_limit: int | None = None,
) -> list[MonthFigures]:
    """Figures for one user, or every user with a budget or spend in the month."""
    if user_id is not None:
        users = [user_id]
    else:
        users = [r["user_id"] for r in conn.execute(q("budget_users_for_month"), {"month": month})]
    return [month_figures(conn, u, month, default_limit) for u in users]
