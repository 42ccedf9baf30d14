"""When reports refresh: the current month every hour, the previous month finalized once.

Both start RUNNING. The hourly run reads only the days that changed. The finalizing run is
on the 1st at 06:00 UTC, after the grace period for late webhooks and the reconciler
(reports.months.FINALIZE_GRACE): a rebuild that reads every day of the month from the
ledger and marks the month final.
"""

from datetime import UTC, datetime

import dagster as dg

from renderqueue_pipeline.defs.reports.assets import SpendReportConfig
from renderqueue_pipeline.defs.reports.jobs import spend_report
from renderqueue_pipeline.reports.months import (
    FINALIZE_GRACE,
    month_label,
    parse_month,
    previous_month,
)


@dg.schedule(
    job=spend_report,
    cron_schedule="15 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Refresh the current UTC month's spend report every hour (changed days only).",
)
def spend_report_current_month_schedule(context: dg.ScheduleEvaluationContext):
    moment = (context.scheduled_execution_time or datetime.now(UTC)).astimezone(UTC)
    month = parse_month(moment.date())
    return dg.RunRequest(
        run_key=f"{month_label(month)}@{moment:%Y-%m-%dT%H:%M}",
        partition_key=f"{month:%Y-%m-%d}",
        tags={"renderqueue/report_mode": "refresh"},
    )


FINALIZE_HOUR = int(FINALIZE_GRACE.total_seconds() // 3600)


@dg.schedule(
    job=spend_report,
    cron_schedule=f"0 {FINALIZE_HOUR} 1 * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Finalize the previous UTC month on the 1st at 06:00 (after the grace period).",
)
def spend_report_finalize_schedule(context: dg.ScheduleEvaluationContext):
    moment = (context.scheduled_execution_time or datetime.now(UTC)).astimezone(UTC)
    month = previous_month(parse_month(moment.date()))
    return dg.RunRequest(
        run_key=f"final:{month_label(month)}",
        partition_key=f"{month:%Y-%m-%d}",
        run_config=dg.RunConfig(ops={"monthly_spend_tables": SpendReportConfig(rebuild=True)}),
        tags={"renderqueue/report_mode": "finalize"},
    )
