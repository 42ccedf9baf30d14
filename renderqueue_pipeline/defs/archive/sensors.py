"""archive_sensor: launch an archive run when rows are due and none is in flight."""

import dagster as dg

from renderqueue_pipeline.archive import archive_due_count
from renderqueue_pipeline.defs.archive.assets import ArchiveRunConfig
from renderqueue_pipeline.defs.archive.jobs import archive_outputs
from renderqueue_pipeline.defs.archive.resources import ArchiveResource
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.defs.shared import IN_FLIGHT_RUN_STATUSES


@dg.sensor(
    job=archive_outputs,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Finds completed outputs not yet archived (through the backlog index) and "
    "launches one archive_outputs run at a time, each taking a bounded number of rows.",
)
def archive_sensor(
    context: dg.SensorEvaluationContext, ledger: LedgerDatabase, archive: ArchiveResource
):
    in_flight = context.instance.get_run_records(
        dg.RunsFilter(job_name=archive_outputs.name, statuses=IN_FLIGHT_RUN_STATUSES), limit=1
    )
    if in_flight:
        return dg.SkipReason(f"archive run {in_flight[0].dagster_run.run_id} is still in flight")
    limit = archive.batch_rows
    with ledger.connect() as conn:
        due = archive_due_count(conn, cap=limit)
    if due == 0:
        return dg.SkipReason("no completed output is due for archiving")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_config=dg.RunConfig(ops={"archived_outputs": ArchiveRunConfig(limit=limit)}),
                tags={"renderqueue/archive_due": str(due)},
            )
        ]
    )
