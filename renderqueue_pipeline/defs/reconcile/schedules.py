"""`reconcile_every_5m`: the reconciler runs by itself, never two runs at once."""

from __future__ import annotations

import dagster as dg

from renderqueue_pipeline.defs.reconcile.jobs import reconcile_ledger
from renderqueue_pipeline.defs.shared import IN_FLIGHT_RUN_STATUSES


@dg.schedule(
    job=reconcile_ledger,
    cron_schedule="*/5 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every 5 minutes; skipped while the previous reconcile run is in flight.",
)
def reconcile_every_5m(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
    in_flight = context.instance.get_run_records(
        dg.RunsFilter(job_name=reconcile_ledger.name, statuses=IN_FLIGHT_RUN_STATUSES), limit=1
    )
    if in_flight:
        run = in_flight[0].dagster_run
        return dg.SkipReason(
            f"reconcile run {run.run_id} is still {run.status.value.lower()}; "
            "skipping this tick so two passes never overlap"
        )
    return dg.RunRequest(run_key=context.scheduled_execution_time.isoformat())
