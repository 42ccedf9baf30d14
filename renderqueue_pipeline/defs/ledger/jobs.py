"""Ledger housekeeping: migrate, then report the state of the ledger."""

from dagster import MetadataValue, OpExecutionContext, job, op

from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.defs.shared import domain_tags
from renderqueue_pipeline.ledger.report import ledger_status
from renderqueue_pipeline.money import dollars


@op
def migrate_ledger(context: OpExecutionContext, ledger: LedgerDatabase) -> list[str]:
    """Apply pending migrations (a no-op when up to date)."""
    applied = migrate(ledger.resolved_url())
    context.log.info(f"applied {applied}" if applied else "ledger schema is up to date")
    return applied


@op
def report_ledger_status(
    context: OpExecutionContext, ledger: LedgerDatabase, applied: list[str]
) -> dict:
    """Generations by status and spend by endpoint, as run metadata."""
    with ledger.connect() as conn:
        status = ledger_status(conn)
    by_status = {r["status"]: r["generations"] for r in status["by_status"]}
    spend = "\n".join(
        f"| {r['endpoint']} | {r['generations']} | {dollars(r['cost_micros'])} |"
        for r in status["by_endpoint"]
    )
    context.add_output_metadata(
        {
            "generations": MetadataValue.int(sum(by_status.values())),
            "by_status": MetadataValue.json(by_status),
            "spend_by_endpoint": MetadataValue.md(
                "| endpoint | generations | cost |\n|---|---|---|\n" + spend
            ),
            "events_waiting_for_row": MetadataValue.int(status["waiting"][0]["waiting"]),
        }
    )
    return by_status


@job(
    description="Migrate the ledger and report generations by status and spend by endpoint.",
    tags=domain_tags("ledger"),
)
def ledger_status_job() -> None:
    report_ledger_status(migrate_ledger())
