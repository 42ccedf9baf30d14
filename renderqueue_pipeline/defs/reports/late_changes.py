"""A closed month is refreshed after any late change to its generations.

The month was finalized on the 1st at 06:00 UTC; a change the ledger takes after that (a
late webhook, fal's billed figures applied) makes its tables stale. This sensor asks for
one refresh per late change (run key: the month and the report it is late for); the run's
blocking report_*_matches_ledger checks then show the refreshed tables equal the ledger.
"""

from __future__ import annotations

import dagster as dg

from renderqueue_pipeline.defs.reports.jobs import spend_report
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.reports.late_changes import late_changes


@dg.sensor(
    job=spend_report,
    minimum_interval_seconds=600,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Refresh a finalized month's spend report when the ledger changed after it.",
)
def closed_month_late_change_sensor(
    context: dg.SensorEvaluationContext, ledger: LedgerDatabase
) -> dg.SensorResult:
    with ledger.connect() as conn:
        found = late_changes(conn)
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"late:{change.month:%Y-%m}@{change.report_snapshot_at.isoformat()}",
                partition_key=f"{change.month:%Y-%m-%d}",
                tags={
                    "renderqueue/report_mode": "late_change",
                    "renderqueue/late_days": ",".join(f"{d:%d}" for d in change.days),
                },
            )
            for change in found
        ],
        skip_reason=None if found else "no closed month changed after its report",
    )
