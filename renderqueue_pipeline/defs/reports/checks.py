"""The report's checks: each calls one function of reports.checks and shows what it found.

Blocking where a wrong report would mislead (figures that differ from the ledger, a cost
understated by a missing price): the files are not written then.
"""

import dagster as dg

from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.defs.shared import monthly_partitions
from renderqueue_pipeline.ledger import ledger_now
from renderqueue_pipeline.reports import checks
from renderqueue_pipeline.reports.months import parse_month


def _result(finding: checks.Finding, month_key: str, *, blocking: bool) -> dg.AssetCheckResult:
    metadata = {
        key: dg.MetadataValue.md(value) if key == "differences" else value
        for key, value in finding.metadata.items()
    }
    return dg.AssetCheckResult(
        passed=finding.passed,
        severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN,
        description=finding.summary,
        metadata={
            "month": parse_month(month_key).strftime("%Y-%m"),
            "found": finding.summary,
            **metadata,
        },
    )


@dg.asset_check(
    asset="monthly_spend_by_user",
    blocking=True,
    partitions_def=monthly_partitions,
    description="By user, the month's counts, seconds and micro-dollars equal the ledger's.",
)
def report_by_user_matches_ledger(
    context: dg.AssetCheckExecutionContext, ledger: LedgerDatabase
) -> dg.AssetCheckResult:
    with ledger.connect() as conn:
        finding = checks.report_matches_ledger(conn, parse_month(context.partition_key), "user")
    return _result(finding, context.partition_key, blocking=True)


@dg.asset_check(
    asset="monthly_spend_by_endpoint",
    blocking=True,
    partitions_def=monthly_partitions,
    description="By endpoint, the month's counts, seconds and micro-dollars equal the ledger's.",
)
def report_by_endpoint_matches_ledger(
    context: dg.AssetCheckExecutionContext, ledger: LedgerDatabase
) -> dg.AssetCheckResult:
    with ledger.connect() as conn:
        finding = checks.report_matches_ledger(conn, parse_month(context.partition_key), "endpoint")
    return _result(finding, context.partition_key, blocking=True)


@dg.asset_check(
    asset="monthly_spend_by_endpoint",
    blocking=True,
    partitions_def=monthly_partitions,
    description="No completed generation of the month lacks a price (its cost is understated).",
)
def completed_generations_are_priced(
    context: dg.AssetCheckExecutionContext, ledger: LedgerDatabase
) -> dg.AssetCheckResult:
    with ledger.connect() as conn:
        finding = checks.completed_generations_are_priced(conn, parse_month(context.partition_key))
    return _result(finding, context.partition_key, blocking=True)


@dg.asset_check(
    asset="daily_spend",
    partitions_def=monthly_partitions,
    description="No generation of the month has been open for more than 24 hours.",
)
def no_generation_open_over_24h(
    context: dg.AssetCheckExecutionContext, ledger: LedgerDatabase
) -> dg.AssetCheckResult:
    with ledger.connect() as conn:
        finding = checks.no_generation_open_too_long(
            conn, parse_month(context.partition_key), ledger_now(conn)
        )
    return _result(finding, context.partition_key, blocking=False)


@dg.asset_check(
    asset="daily_spend",
    partitions_def=monthly_partitions,
    description="Outputs of the month that failed to archive: count and first request ids.",
)
def no_archive_failures(
    context: dg.AssetCheckExecutionContext, ledger: LedgerDatabase
) -> dg.AssetCheckResult:
    with ledger.connect() as conn:
        finding = checks.no_archive_failures(conn, parse_month(context.partition_key))
    return _result(finding, context.partition_key, blocking=False)
