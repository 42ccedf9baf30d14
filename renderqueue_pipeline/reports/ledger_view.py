"""A month's spend straight from the ledger, in the report tables' shape (for the CLI).

The same figures the report tables hold, computed from `generations` alone, so
`renderqueue report` works before any materialization and can be compared with the tables.
"""

from __future__ import annotations

from datetime import date

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.money import cents
from renderqueue_pipeline.reports.checks import (
    add_billed_totals,
    fold_facts,
    ledger_facts,
    per_second,
    snapshot,
)
from renderqueue_pipeline.reports.figures import cli_columns
from renderqueue_pipeline.reports.months import month_range


def columns_for(by: str) -> list[str]:
    """The report tables' columns by user, endpoint or batch (reports/figures.py)."""
    return cli_columns(by)


def month_from_ledger(conn: LedgerConnection, month: date, by: str) -> list[dict]:
    """Rows by user, endpoint or batch, costliest first, with the report tables' columns."""
    with snapshot(conn):
        if by in ("user", "endpoint"):
            rows = fold_facts(ledger_facts(conn, month), by)
        else:
            start, end = month_range(month)
            rows = conn.execute(q("ledger_month_by_batch"), {"start": start, "end": end}).fetchall()
            for row in rows:
                row["cost_cents"] = cents(row["cost_micros"])
                row["micros_per_completed_second"] = per_second(
                    row["cost_micros"], row["billed_seconds"]
                )
                row["cost_minus_estimate_micros"] = (
                    row["cost_micros"] + row["open_estimate_micros"] - row["submit_estimate_micros"]
                )
                add_billed_totals(
                    row, row.pop("fal_billed_micros"), row.pop("billed_computed_micros")
                )
            rows.sort(key=lambda r: (-r["cost_micros"], r["batch_id"] is None, r["batch_id"] or 0))
    keep = columns_for(by)
    return [{c: r[c] for c in keep} for r in rows]
