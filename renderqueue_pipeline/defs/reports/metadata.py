"""Report figures as Dagster metadata under stable keys (compare months in the UI)."""

from __future__ import annotations

from typing import Any

import dagster as dg

from renderqueue_pipeline.money import dollars, micros_to_usd
from renderqueue_pipeline.reports.figures import REPORT_KEYS, STATUS_COUNTS
from renderqueue_pipeline.reports.spend import MonthReport
from renderqueue_pipeline.reports.storage import WrittenFile
from renderqueue_pipeline.reports.summary import top_table

# the monthly tables' top-10 is by their key (spend_daily shows the users' and endpoints')
_KEYS = {t: key[0] for t, key in REPORT_KEYS.items() if t != "spend_daily"}


def table_metadata(report: MonthReport, table: str, rows: list[dict]) -> dict[str, Any]:
    """The partition's row count, the month's totals (numbers, same keys every month), a
    top-10 table. Not `dagster/row_count`: that is the whole table's, every month's."""
    metadata: dict[str, Any] = {
        "dagster/partition_row_count": len(rows),
        "table": table,
        "month": f"{report.month:%Y-%m}",
        "state": report.state,
        "total_spend_usd": dg.MetadataValue.float(micros_to_usd(report.cost_micros)),
        "total_spend": dollars(report.cost_micros),
        "cost_micros": report.cost_micros,
        "open_estimate_micros": report.open_estimate_micros,
        # ours against fal's bill (spend domain): "-" until fal's billing is loaded
        "computed_micros": report.computed_micros,
        "computed_usd": dg.MetadataValue.float(micros_to_usd(report.computed_micros)),
        "billed_generations": report.billed_generations,
        "fal_billed": "-"
        if report.fal_billed_micros is None
        else dollars(report.fal_billed_micros),
        "billed_difference": "-"
        if report.billed_difference_micros is None
        else dollars(report.billed_difference_micros),
        "generations": report.generations,
        **{count: sum(int(r[count]) for r in rows) for count in STATUS_COUNTS},
        # when the month's ledger last changed after it ended ("-": never); "yes" when that
        # was after the month was finalized (the rebuild sensor's work)
        "last_changed_at": "-"
        if report.last_changed_at is None
        else report.last_changed_at.isoformat(),
        "changed_after_finalization": "yes"
        if report.finalized_at is not None
        and report.last_changed_at is not None
        and report.last_changed_at > report.finalized_at
        else "no",
        "rebuilt": report.rebuilt,
        "days_recomputed": report.days_recomputed,
        "days_reused": report.days_reused,
        "refresh_seconds": dg.MetadataValue.float(round(report.seconds, 3)),
    }
    if report.fal_billed_micros is not None:  # numbers to plot across months, once billed
        metadata["fal_billed_usd"] = dg.MetadataValue.float(micros_to_usd(report.fal_billed_micros))
        metadata["billed_difference_usd"] = dg.MetadataValue.float(
            micros_to_usd(report.billed_difference_micros or 0)
        )
    if table in _KEYS:
        metadata["top_10"] = dg.MetadataValue.md(top_table(rows, _KEYS[table]))
    if table == "spend_daily":
        metadata["top_10_users"] = dg.MetadataValue.md(top_table(report.by_user, "user_id"))
        metadata["top_10_endpoints"] = dg.MetadataValue.md(
            top_table(report.by_endpoint, "endpoint")
        )
    return metadata


def files_metadata(written: list[WrittenFile]) -> dict[str, Any]:
    """A link per file (the chart first), and how many rows each table file holds."""
    metadata: dict[str, Any] = {}
    for f in written:
        if f.kind == "chart":
            metadata["chart"] = dg.MetadataValue.url(f.url)
        else:
            metadata[f"{f.table}_{f.kind}"] = dg.MetadataValue.url(f.url)
    metadata["files"] = dg.MetadataValue.md(
        "| file | rows | bytes |\n|---|---:|---:|\n"
        + "\n".join(f"| [{f.name}]({f.url}) | {f.rows} | {f.bytes} |" for f in written)
    )
    # rows across the month's table files: no one table's row count
    metadata["rows_written"] = sum(f.rows for f in written if f.kind == "parquet")
    return metadata
