"""The billing check: the ledger against fal's bill, request by request.

("Reconcile" alone is the ledger reconciler, `renderqueue_pipeline/reconcile/`; the tables
and the Dagster assets keep their `billing_reconciliation` names.)

Outcomes (per request of a day; a day is the generation's UTC creation day, or fal's
billing day for a request the ledger does not know):

- matched: fal's figure and ours are within 1 micro-dollar;
- amount_differs: both billed, different amounts; `reason` says why: units (fal billed
  other seconds than we priced), price (another unit price), discount, or other;
- billed_not_completed: fal billed it, the ledger says failed, canceled or still open;
- not_billed: completed in the ledger, no billing event after the grace period;
- awaiting_billing: completed in the ledger, within the grace period (not a finding yet);
- unknown_to_ledger: billed by fal, no generation row; attributed to a batch item when one
  fits (same request id, or an unknown-outcome submit of the same endpoint shortly before);
- no_charge: failed, canceled or open and not billed (right; only counted).

Money is compared in micro-dollars: fal's nano-dollars summed per request, then rounded
once, half up.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.queries import q

OUTCOMES = (
    "matched",
    "amount_differs",
    "billed_not_completed",
    "not_billed",
    "awaiting_billing",
    "unknown_to_ledger",
    "no_charge",
)
#: Outcomes whose money is in "our computed total" (the ledger says completed).
OURS = ("matched", "amount_differs", "not_billed", "awaiting_billing")
#: Outcomes whose money is in "fal's billed total".
FALS = ("matched", "amount_differs", "billed_not_completed", "unknown_to_ledger")
#: The columns of a stored finding, in COPY order (spend_copy_reconciliation).
FINDING_COLUMNS = (
    "day",
    "request_id",
    "endpoint",
    "outcome",
    "reason",
    "ledger_status",
    "our_micros",
    "fal_micros",
    "fal_nano_usd",
    "our_seconds",
    "fal_units",
    "our_micros_per_second",
    "fal_micros_per_unit",
    "percent_discount",
    "batch_item_id",
    "created_at",
    "billed_at",
)
#: Outcomes that are findings (something to look at).
FINDINGS = ("amount_differs", "billed_not_completed", "not_billed", "unknown_to_ledger")


@dataclass(frozen=True)
class OutcomeTotal:
    requests: int = 0
    our_micros: int = 0
    fal_micros: int = 0


@dataclass
class BillingCheck:
    """Totals of a range by outcome, and what they add up to."""

    start_day: dt.date
    end_day: dt.date
    outcomes: dict[str, OutcomeTotal] = field(default_factory=dict)
    largest: list[dict[str, Any]] = field(default_factory=list)
    billed_applied: int = 0

    def count(self, outcome: str) -> int:
        return self.outcomes.get(outcome, OutcomeTotal()).requests

    @property
    def requests(self) -> int:
        return sum(t.requests for t in self.outcomes.values())

    @property
    def our_micros(self) -> int:
        """Our computed total: every generation the ledger says completed."""
        return sum(self.outcomes.get(o, OutcomeTotal()).our_micros for o in OURS)

    @property
    def awaiting_micros(self) -> int:
        return self.outcomes.get("awaiting_billing", OutcomeTotal()).our_micros

    @property
    def fal_micros(self) -> int:
        """fal's billed total: every billed request, known to the ledger or not."""
        return sum(self.outcomes.get(o, OutcomeTotal()).fal_micros for o in FALS)

    @property
    def difference_micros(self) -> int:
        """fal's total minus ours, leaving out what fal has not had time to bill yet."""
        return self.fal_micros - (self.our_micros - self.awaiting_micros)

    @property
    def difference_percent(self) -> float:
        base = max(self.fal_micros, self.our_micros - self.awaiting_micros)
        return 0.0 if base == 0 else 100.0 * abs(self.difference_micros) / base

    @property
    def findings(self) -> int:
        return sum(self.count(o) for o in FINDINGS)

    def as_metadata(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_outcome": {o: self.count(o) for o in OUTCOMES},
            "our_computed_micros": self.our_micros,
            "fal_billed_micros": self.fal_micros,
            "difference_micros": self.difference_micros,
            "difference_percent": round(self.difference_percent, 4),
            "awaiting_billing_micros": self.awaiting_micros,
        }


def _days(start: dt.datetime, end: dt.datetime) -> dict[str, dt.date]:
    return {
        "start_day": start.astimezone(dt.UTC).date(),
        "end_day": end.astimezone(dt.UTC).date(),
    }


def check_billing(
    conn: LedgerConnection,
    start: dt.datetime,
    end: dt.datetime,
    *,
    grace: dt.timedelta = dt.timedelta(hours=48),
    now: dt.datetime | None = None,
) -> BillingCheck:
    """Classify every request of [start, end) (UTC day boundaries) in one transaction,
    replacing that range's results; idempotent. One read-only query classifies; the few
    findings and the day totals are written back with COPY."""
    now = now or dt.datetime.now(dt.UTC)
    days = _days(start, end)
    params = {"start": start, "end": end, "now": now, "grace": grace}
    with conn.transaction():
        conn.execute(q("billing_check_work_mem"))
        conn.execute(q("spend_delete_reconciliation_range"), days)
        totals: dict[tuple[dt.date, str], list[int]] = {}
        with conn.cursor() as cursor:
            groups = cursor.execute(q("spend_classify_range"), params).fetchall()
            with cursor.copy(q("spend_copy_reconciliation")) as copy:
                for row in groups:
                    total = totals.setdefault((row["day"], row["outcome"]), [0, 0, 0])
                    total[0] += row["requests"]
                    total[1] += row["our_micros_total"]
                    total[2] += row["fal_micros_total"]
                    if row["request_id"] is not None:
                        copy.write_row([row[column] for column in FINDING_COLUMNS])
            cursor.executemany(
                q("spend_insert_reconciliation_day"),
                [
                    {
                        "day": day,
                        "outcome": outcome,
                        "requests": n,
                        "our_micros": ours,
                        "fal_micros": fals,
                    }
                    for (day, outcome), (n, ours, fals) in sorted(totals.items())
                ],
            )
        conn.execute(q("spend_attribute_unknown"), days)
        conn.execute(q("spend_mark_unattributed"), days)
    return summarize(conn, start, end, largest=0)


def apply_billed(conn: LedgerConnection, start: dt.datetime, end: dt.datetime) -> int:
    """fal's figure becomes the cost of each billed, completed generation of the range
    (cost_basis 'billed'; our figure kept in computed_cost_micros). Returns rows changed."""
    with conn.transaction():
        return conn.execute(q("spend_apply_billed"), {"start": start, "end": end}).rowcount


def summarize(
    conn: LedgerConnection, start: dt.datetime, end: dt.datetime, *, largest: int = 10
) -> BillingCheck:
    """The stored results of a range: totals by outcome and the largest differences."""
    days = _days(start, end)
    result = BillingCheck(days["start_day"], days["end_day"])
    with conn.transaction():
        for row in conn.execute(q("spend_outcomes"), days).fetchall():
            result.outcomes[row["outcome"]] = OutcomeTotal(
                int(row["requests"]), int(row["our_micros"]), int(row["fal_micros"])
            )
        if largest:
            result.largest = conn.execute(
                q("spend_largest_differences"), {**days, "limit": largest}
            ).fetchall()
    return result
