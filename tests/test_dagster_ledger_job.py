"""The ledger job on a real Dagster instance whose storage is Postgres (never SQLite)."""

from __future__ import annotations

import psycopg
from dagster import instance_for_test
from ledger_helpers import submit_row

from renderqueue_pipeline.defs.ledger.jobs import ledger_status_job
from renderqueue_pipeline.defs.resources import LedgerDatabase


def test_ledger_status_job_reports_the_ledger(
    conn: psycopg.Connection, ledger_url: str, dagster_storage: str
) -> None:
    submit_row(conn)
    submit_row(conn)
    storage = dagster_storage
    assert storage.startswith("postgresql+psycopg2://")
    overrides = {"storage": {"postgres": {"postgres_url": storage}}}
    with instance_for_test(overrides=overrides) as instance:
        result = ledger_status_job.execute_in_process(
            instance=instance, resources={"ledger": LedgerDatabase(url=ledger_url)}
        )
        assert result.success
        assert result.output_for_node("report_ledger_status") == {"submitted": 2}
        assert instance.get_run_by_id(result.run_id) is not None
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
