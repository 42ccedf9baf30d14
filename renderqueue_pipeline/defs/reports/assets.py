"""Monthly spend assets: four report tables refreshed together, then files and a chart.

Thin: each asset reads its resources and calls one function of renderqueue_pipeline.reports.
"""

import dagster as dg

from renderqueue_pipeline.defs.freshness.policies import current_month_policy
from renderqueue_pipeline.defs.ledger.assets import generations
from renderqueue_pipeline.defs.reports.metadata import files_metadata, table_metadata
from renderqueue_pipeline.defs.reports.resources import ReportStorage
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.defs.shared import monthly_partitions
from renderqueue_pipeline.defs.spend.assets import billing_reconciliation
from renderqueue_pipeline.reports.months import parse_month
from renderqueue_pipeline.reports.spend import MonthReport, refresh_month
from renderqueue_pipeline.reports.storage import export_month

GROUP = "reports"
TABLE_ASSETS = {
    "monthly_spend_by_user": ("spend_monthly_by_user", "by_user"),
    "monthly_spend_by_endpoint": ("spend_monthly_by_endpoint", "by_endpoint"),
    "monthly_spend_by_batch": ("spend_monthly_by_batch", "by_batch"),
    "daily_spend": ("spend_daily", "daily"),
}


class SpendReportConfig(dg.Config):
    """Launchpad options for a month's refresh."""

    rebuild: bool = False  # read every day of the month from the ledger, reusing nothing


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            name,
            # the month's generations, with the billed figures billing_reconciliation wrote
            deps=[generations, billing_reconciliation],
            group_name=GROUP,
            kinds={"postgres"},
            description=f"Postgres table `{table}`: one month per partition (docs/reports.md).",
            metadata={"table": table},
            freshness_policy=current_month_policy,
        )
        for name, (table, _) in TABLE_ASSETS.items()
    ],
    partitions_def=monthly_partitions,
    can_subset=False,
)
def monthly_spend_tables(
    context: dg.AssetExecutionContext, config: SpendReportConfig, ledger: LedgerDatabase
):
    """Refresh (or finalize, past the 1st 06:00 UTC) one month's report tables in one
    transaction; the checks compare them with the ledger afterwards."""
    month = parse_month(context.partition_key)
    with ledger.connect() as conn:
        report: MonthReport = refresh_month(conn, month, rebuild=config.rebuild)
    context.log.info(
        f"{report.month:%Y-%m} ({report.state}): {report.days_recomputed} day(s) read, "
        f"{report.days_reused} reused, {report.seconds:.2f} s"
    )
    for name, (table, attribute) in TABLE_ASSETS.items():
        yield dg.MaterializeResult(
            asset_key=name, metadata=table_metadata(report, table, getattr(report, attribute))
        )


@dg.asset(
    partitions_def=monthly_partitions,
    group_name=GROUP,
    kinds={"parquet", "csv"},
    deps=list(TABLE_ASSETS),
    freshness_policy=current_month_policy,
)
def spend_report_files(
    context: dg.AssetExecutionContext, ledger: LedgerDatabase, report_storage: ReportStorage
) -> dg.MaterializeResult:
    """Parquet and CSV of each report table, and a PNG chart of daily spend by endpoint,
    under RENDERQUEUE_STORAGE_URL at reports/spend/YYYY-MM/."""
    month = parse_month(context.partition_key)
    with ledger.connect() as conn:
        written = export_month(conn, month, report_storage.resolved_url())
    return dg.MaterializeResult(metadata=files_metadata(written))
