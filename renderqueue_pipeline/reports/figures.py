"""The monthly report's figures and columns, listed once.

The report rows live in one table, `spend_report_rows`, keyed by (month, dimension, key)
and written by one GROUPING SETS statement (`report_rows_insert` in
sql/queries/reports.sql); `spend_monthly_by_user`, `spend_monthly_by_endpoint`,
`spend_monthly_by_batch` and `spend_daily` are views over it
(sql/schema/70_reports.sql). Everything in Python that names a figure reads it from
here: the report files' columns, the checks' comparison with the ledger, the CLI's
columns and the Dagster metadata's counts. `tests/test_report_figures.py` holds the views
to `REPORT_COLUMNS`, so adding a figure is: its column and view column (one migration),
its expression (sql/queries/reports.sql), and its name here.
"""

from __future__ import annotations

# The figures of a report row, in the order the CLI's CSV and JSON print them.
FIGURES = (
    "generations",
    "completed",
    "failed",
    "canceled",
    "open",
    "unpriced",
    "billed_seconds",
    "cost_micros",
    "cost_cents",
    "micros_per_completed_second",
    "open_estimate_micros",
    "computed_micros",
    "billed_generations",
    "fal_billed_micros",
    "billed_difference_micros",
)
# Only in the by-batch rows: the estimates recorded at submit, and the spend against them.
BATCH_FIGURES = ("submit_estimate_micros", "cost_minus_estimate_micros")
# Derived from the others (cents, a rate, the batch's overrun): the checks compare what
# they are derived from.
DERIVED = ("cost_cents", "micros_per_completed_second", "cost_minus_estimate_micros")
# Null while none of the key's generations was billed (derived from two sums).
BILLED = ("fal_billed_micros", "billed_difference_micros")
# Sums over a key's completed generations, as `ledger_month_facts` (sql/queries/reports.sql)
# gives them by status: the checks and the CLI fold them into report rows unchanged.
COMPLETED_SUMS = ("billed_seconds", "cost_micros", "computed_micros", "billed_generations")
# Counts by status, summed over a table's rows into the asset's metadata.
STATUS_COUNTS = ("completed", "failed", "canceled", "open")

# Each report view (and its Parquet and CSV file): its key and the order of its columns,
# as the tables were first made; a new figure is appended at the end of each.
REPORT_KEYS = {
    "spend_monthly_by_user": ("user_id",),
    "spend_monthly_by_endpoint": ("endpoint",),
    "spend_monthly_by_batch": ("batch_id", "source"),
    "spend_daily": ("day", "endpoint"),
}
_MONTHLY = (
    "generations",
    "completed",
    "failed",
    "canceled",
    "open",
    "unpriced",
    "billed_seconds",
    "cost_micros",
    "cost_cents",
    "micros_per_completed_second",
    "open_estimate_micros",
)
REPORT_COLUMNS = {
    "spend_monthly_by_user": (
        "month",
        "user_id",
        *_MONTHLY,
        "fal_billed_micros",
        "billed_difference_micros",
        "computed_at",
        "computed_micros",
        "billed_generations",
    ),
    "spend_monthly_by_endpoint": (
        "month",
        "endpoint",
        *_MONTHLY,
        "fal_billed_micros",
        "billed_difference_micros",
        "computed_at",
        "computed_micros",
        "billed_generations",
    ),
    "spend_monthly_by_batch": (
        "month",
        "batch_id",
        "source",
        *_MONTHLY,
        *BATCH_FIGURES,
        "fal_billed_micros",
        "billed_difference_micros",
        "computed_at",
        "computed_micros",
        "billed_generations",
    ),
    # a day's rate per second is not reported (the month's is)
    "spend_daily": (
        "day",
        "month",
        "endpoint",
        *(c for c in _MONTHLY if c != "micros_per_completed_second"),
        "computed_at",
        "computed_micros",
        "billed_generations",
        "fal_billed_micros",
        "billed_difference_micros",
    ),
}
REPORT_TABLES = tuple(REPORT_COLUMNS)
# The figures the checks compare, key by key, with the ledger's.
COMPARED = tuple(f for f in FIGURES if f not in DERIVED)
# CLI (`renderqueue report --by ...`): the key columns, then every figure.
CLI_KEYS = {"user": ("user_id",), "endpoint": ("endpoint",), "batch": ("batch_id", "source")}


def cli_columns(by: str) -> list[str]:
    """The CLI's columns by user, endpoint or batch: the key, then every figure."""
    return [*CLI_KEYS[by], *FIGURES, *(BATCH_FIGURES if by == "batch" else ())]
