"""Rebuild a month's report when its ledger changed after the month ended.

Triggers record every change to a closed month's rows in the writer's own transaction
(sql/functions/report_changes.sql); this sensor asks for one rebuild run per changed
month (the whole partition: tables, checks, files), skips a month while a run of its
partition is queued or running, and says why in its SkipReason. Starts RUNNING; a tick
every 10 minutes rebuilds a change well within the hour.
"""

from __future__ import annotations

import dagster as dg

from renderqueue_pipeline.defs.reports.assets import SpendReportConfig
from renderqueue_pipeline.defs.reports.jobs import spend_report
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.defs.shared import IN_FLIGHT_RUN_STATUSES, monthly_partitions
from renderqueue_pipeline.reports.months import month_label
from renderqueue_pipeline.reports.spend import changed_months


def _in_flight(instance: dg.DagsterInstance, partition_key: str) -> str | None:
    """The id of a spend_report run of this partition that is queued or running."""
    runs = instance.get_run_records(
        filters=dg.RunsFilter(
            job_name=spend_report.name,
            statuses=IN_FLIGHT_RUN_STATUSES,
            tags={"dagster/partition": partition_key},
        ),
        limit=1,
    )
    return runs[0].dagster_run.run_id if runs else None


@dg.sensor(
    job=spend_report,
    minimum_interval_seconds=600,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Rebuild each month whose ledger changed after the month ended (one run "
    "per month, none while one is in flight).",
)
def spend_report_changed_months_sensor(
    context: dg.SensorEvaluationContext, ledger: LedgerDatabase
) -> dg.SensorResult:
    with ledger.connect() as conn:
        months = changed_months(conn)
    known = set(monthly_partitions.get_partition_keys())
    requests: list[dg.RunRequest] = []
    skipped: list[str] = []
    for row in months:
        key = f"{row['month']:%Y-%m-%d}"
        label = month_label(row["month"])
        if key not in known:
            skipped.append(f"{label}: not a report partition")
            continue
        running = _in_flight(context.instance, key)
        if running:
            skipped.append(f"{label}: rebuild run {running[:8]} in flight")
            continue
        requests.append(
            dg.RunRequest(
                partition_key=key,
                run_config=dg.RunConfig(
                    ops={"monthly_spend_tables": SpendReportConfig(rebuild=True)}
                ),
                tags={
                    "renderqueue/report_mode": "rebuild",
                    "renderqueue/changes": str(row["changes"]),
                    "renderqueue/changed_at": row["last_changed_at"].isoformat(),
                },
            )
        )
    if requests:
        return dg.SensorResult(run_requests=requests)
    reason = "; ".join(skipped) if skipped else "no month changed since its last rebuild"
    return dg.SensorResult(skip_reason=dg.SkipReason(reason))
