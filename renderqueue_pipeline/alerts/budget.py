"""Budget alerts that fire once per user, month and threshold.

`evaluate_budget_alerts` is the one entry point (the Dagster sensor and `renderqueue
budget alerts` both call it). It has two steps:

1. Decide: for every user with a budget this month (their `user_budgets` row, or the
   default budget), read spent + in flight with the admission's own figures
   (`batch.budget.month_figures`) and insert one `budget_alerts` row per threshold crossed,
   in the same transaction. The unique (user, month, threshold) key makes the insert the
   decision: a second tick, a restart or another process gets nothing back.
2. Deliver: claim each due, undelivered row (FOR UPDATE SKIP LOCKED), post it, and mark it
   delivered in that transaction; a failed post records attempts, the redacted error and
   the next attempt (exponential backoff), and a later evaluation retries it.

A process that dies after the receiver accepted a post but before its commit sends that
alert again on the next evaluation (at least once, never twice otherwise).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from renderqueue_pipeline.alerts.webhook import DeliveryError, post_with_retries, redact
from renderqueue_pipeline.batch.budget import (
    MonthFigures,
    default_limit_micros,
    month_figures,
)
from renderqueue_pipeline.db import LedgerConnection, one_row
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.money import usd
from renderqueue_pipeline.settings import get_settings

RETRY_BASE_S = 60  # the first retry a minute later, then 2, 4, ... up to an hour
RETRY_MAX_S = 3600
ERROR_MAX_CHARS = 500


@dataclass(frozen=True)
class AlertOutcome:
    """One alert this evaluation tried to deliver."""

    id: int
    user_id: int
    month: date
    threshold_percent: int
    text: str
    delivered: bool
    attempts: int  # in total, this evaluation's included
    error: str | None = None
    next_attempt_at: datetime | None = None


@dataclass
class AlertRun:
    """What one evaluation decided and delivered."""

    month: date
    users_checked: int = 0
    recorded: list[int] = field(default_factory=list)  # ids of the new alert rows
    outcomes: list[AlertOutcome] = field(default_factory=list)
    webhook_configured: bool = True

    @property
    def sent(self) -> list[AlertOutcome]:
        return [o for o in self.outcomes if o.delivered]

    @property
    def failed(self) -> list[AlertOutcome]:
        return [o for o in self.outcomes if not o.delivered]

    def summary(self) -> str:
        """One line for a sensor tick or the CLI."""
        parts = [f"{self.month:%Y-%m}: {self.users_checked} users with a budget checked"]
        if self.sent:
            parts.append(
                "sent " + "; ".join(f"user {o.user_id} {o.threshold_percent}%" for o in self.sent)
            )
        if self.failed:
            parts.append(
                "not delivered "
                + "; ".join(
                    f"user {o.user_id} {o.threshold_percent}% after {o.attempts} attempts "
                    f"({o.error}), next try {o.next_attempt_at:%H:%M:%S} UTC"
                    for o in self.failed
                )
            )
        if not self.webhook_configured and self.recorded:
            parts.append(
                f"{len(self.recorded)} alerts recorded, not sent: "
                "RENDERQUEUE_ALERT_WEBHOOK_URL is not set"
            )
        if not self.outcomes and not self.recorded:
            parts.append("no new threshold crossed")
        return "; ".join(parts)


def percent_used(figures: MonthFigures) -> Decimal:
    """Spent + in flight as a percent of the budget (a zero budget counts as 100%)."""
    if not figures.limit_micros:
        return Decimal(100)
    return Decimal(figures.committed_micros * 100) / Decimal(figures.limit_micros)


def crossed(figures: MonthFigures, percents: tuple[int, ...]) -> list[int]:
    """The thresholds spent + in flight has reached (nothing while nothing is committed)."""
    if figures.limit_micros is None or figures.committed_micros <= 0:
        return []
    return [p for p in percents if figures.committed_micros * 100 >= p * figures.limit_micros]


def alert_body(row: dict[str, Any]) -> dict[str, Any]:
    """The Slack-compatible JSON body: `text`, plus the figures as attachment fields."""
    limit, actual, in_flight = row["limit_micros"], row["actual_micros"], row["in_flight_micros"]
    committed = actual + in_flight
    used = Decimal(100) if not limit else Decimal(committed * 100) / Decimal(limit)
    where = "budget" if row["limit_source"] == "user_budgets" else "default budget"
    text = (
        f"Budget alert: user {row['user_id']} reached {row['threshold_percent']}% of the "
        f"{row['month']:%Y-%m} {where}: {usd(committed)} of {usd(limit)} "
        f"({used:.1f}%; spent {usd(actual)} + in flight {usd(in_flight)})"
    )
    figures = [
        ("User", str(row["user_id"])),
        ("Month", f"{row['month']:%Y-%m}"),
        ("Threshold", f"{row['threshold_percent']}%"),
        ("Used", f"{used:.1f}%"),
        ("Budget", usd(limit) + ("" if row["limit_source"] == "user_budgets" else " (default)")),
        ("Spent", usd(actual)),
        ("In flight", usd(in_flight)),
        ("Spent + in flight", usd(committed)),
    ]
    return {
        "text": text,
        "attachments": [
            {
                "color": "danger" if row["threshold_percent"] >= 100 else "warning",
                "fields": [{"title": t, "value": v, "short": True} for t, v in figures],
            }
        ],
    }


def _retry_after_s(total_attempts: int, per_round: int) -> int:
    rounds = max(1, -(-total_attempts // max(per_round, 1)))
    return min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (rounds - 1))


def record_crossings(
    conn: LedgerConnection,
    default_percents: tuple[int, ...],
    default_limit: int | None,
) -> AlertRun:
    """Step 1: insert one alert row per newly crossed threshold, per user, one transaction."""
    with conn.transaction():
        month = one_row(conn.execute(q("alert_clock")))["month"]
        run = AlertRun(month=month)
        users = [r["user_id"] for r in conn.execute(q("budget_users_for_month"), {"month": month})]
        for user_id in users:
            figures = month_figures(conn, user_id, month, default_limit)
            if figures.limit_micros is None:
                continue  # no budget, no alert
            run.users_checked += 1
            own = conn.execute(
                q("user_alert_percents"), {"user_id": user_id, "month": month}
            ).fetchone()
            percents = tuple(own["alert_percents"]) if own and own["alert_percents"] else None
            for threshold in crossed(figures, percents or default_percents):
                row = conn.execute(
                    q("insert_budget_alert"),
                    {
                        "user_id": user_id,
                        "month": month,
                        "threshold_percent": threshold,
                        "limit_micros": figures.limit_micros,
                        "limit_source": figures.limit_source,
                        "actual_micros": figures.actual_micros,
                        "in_flight_micros": figures.in_flight_micros,
                    },
                ).fetchone()
                if row is not None:
                    run.recorded.append(row["id"])
    return run


def deliver_due(
    conn: LedgerConnection,
    url: str,
    *,
    attempts_per_round: int = 3,
    wait_s: float = 1.0,
    limit: int = 50,
    budget_s: float = 30.0,
) -> list[AlertOutcome]:
    """Step 2: deliver due, undelivered alerts once each (one transaction per alert).

    Stops at the first failed delivery (the receiver is likely down: the rest stay due
    for the next evaluation, after the failed one) or after `budget_s` seconds, so that a
    sensor tick stays well within Dagster's evaluation timeout.
    """
    outcomes: list[AlertOutcome] = []
    tried: list[int] = []
    started = time.monotonic()
    while len(tried) < limit and time.monotonic() - started < budget_s:
        with conn.transaction():
            row = conn.execute(q("claim_due_budget_alert"), {"skip_ids": tried}).fetchone()
            if row is None:
                break
            tried.append(row["id"])
            body = alert_body(row)
            try:
                made = post_with_retries(url, body, attempts=attempts_per_round, wait_s=wait_s)
            except DeliveryError as exc:
                error = redact(str(exc), url)[:ERROR_MAX_CHARS]
                total = row["attempts"] + exc.attempts
                failed = one_row(
                    conn.execute(
                        q("mark_budget_alert_failed"),
                        {
                            "id": row["id"],
                            "attempts": exc.attempts,
                            "error": error,
                            "retry_after_s": _retry_after_s(total, attempts_per_round),
                        },
                    )
                )
                outcomes.append(
                    AlertOutcome(
                        row["id"],
                        row["user_id"],
                        row["month"],
                        row["threshold_percent"],
                        body["text"],
                        delivered=False,
                        attempts=failed["attempts"],
                        error=error,
                        next_attempt_at=failed["next_attempt_at"],
                    )
                )
                break
            conn.execute(q("mark_budget_alert_delivered"), {"id": row["id"], "attempts": made})
            outcomes.append(
                AlertOutcome(
                    row["id"],
                    row["user_id"],
                    row["month"],
                    row["threshold_percent"],
                    body["text"],
                    delivered=True,
                    attempts=row["attempts"] + made,
                )
            )
    return outcomes


def evaluate_budget_alerts(
    conn: LedgerConnection,
    *,
    url: str | None = None,
    default_percents: tuple[int, ...] | None = None,
    default_limit: int | None = None,
    wait_s: float = 1.0,
) -> AlertRun:
    """Decide and deliver; arguments left None come from the settings."""

    settings = get_settings()
    if url is None and settings.alert_webhook_url is not None:
        url = settings.alert_webhook_url.get_secret_value()
    if default_percents is None:
        default_percents = settings.budget_alert_percents
    if default_limit is None:
        default_limit = default_limit_micros()
    run = record_crossings(conn, default_percents, default_limit)
    if url:
        run.outcomes = deliver_due(conn, url, wait_s=wait_s)
    else:
        run.webhook_configured = False
    return run


def set_alert_percents(
    conn: LedgerConnection, user_id: int, month: date | None, percents: tuple[int, ...] | None
) -> dict[str, Any] | None:
    """Store a user-month's own thresholds beside its budget (None: back to the default).

    None when the user has no budget row for that month.
    """
    with conn.transaction():
        if month is None:
            month = one_row(conn.execute(q("alert_clock")))["month"]
        return conn.execute(
            q("set_user_alert_percents"),
            {"user_id": user_id, "month": month, "percents": list(percents) if percents else None},
        ).fetchone()


def alerts_for_month(conn: LedgerConnection, month: date | None = None) -> list[dict[str, Any]]:
    """Every alert row of a month (default: the ledger clock's month), for people."""
    if month is None:
        month = one_row(conn.execute(q("alert_clock")))["month"]
    return list(conn.execute(q("budget_alerts_for_month"), {"month": month}))
