"""`reconcile_every_5m` and `reconcile_ledger` on a real Dagster instance (Postgres storage).

The instance is loaded from the product's own dagster.yaml template.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator

import dagster as dg
import fal_client
import psycopg
import pytest
from ledger_helpers import SEEDANCE

from renderqueue_pipeline.dagster_home import instance_config
from renderqueue_pipeline.db.server import sqlalchemy_url
from renderqueue_pipeline.definitions import defs
from renderqueue_pipeline.defs.reconcile.jobs import reconcile_ledger
from renderqueue_pipeline.defs.reconcile.schedules import reconcile_every_5m
from renderqueue_pipeline.defs.resources import LedgerDatabase, fal_connection
from renderqueue_pipeline.ledger.core import _submit_generation
from renderqueue_pipeline.simulator.testing import FAST_TEST_OPTIONS, RunningSimulator

TICK = dt.datetime(2026, 11, 29, 12, 5, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def instance(make_database: Callable[[], str]) -> Iterator[dg.DagsterInstance]:
    """An instance from the dagster.yaml template on a fresh database of the test server."""
    storage = sqlalchemy_url(make_database(), driver="psycopg2")
    with dg.instance_for_test(overrides=instance_config(storage)) as instance:
        yield instance


def evaluate(instance: dg.DagsterInstance) -> dg.RunRequest | dg.SkipReason:
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=TICK)
    return reconcile_every_5m(context)


def test_the_schedule_runs_by_itself_every_five_minutes_in_utc() -> None:

    schedule = defs().resolve_schedule_def("reconcile_every_5m")
    assert schedule.cron_schedule == "*/5 * * * *"
    assert schedule.execution_timezone == "UTC"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert schedule.job_name == "reconcile_ledger"
    op = reconcile_ledger.graph.node_named("reconcile_open_rows").definition
    assert op.pool == "fal_api"  # bounded with every other fal caller across runs


def test_the_schedule_skips_while_its_previous_run_is_in_flight(
    instance: dg.DagsterInstance,
) -> None:
    request = evaluate(instance)
    assert isinstance(request, dg.RunRequest)
    assert request.run_key == TICK.isoformat()

    in_flight = instance.create_run_for_job(
        reconcile_ledger, status=dg.DagsterRunStatus.STARTED, run_config={}
    )
    try:
        skipped = evaluate(instance)
        assert isinstance(skipped, dg.SkipReason)
        assert in_flight.run_id in skipped.skip_message
        assert "started" in skipped.skip_message
    finally:
        instance.delete_run(in_flight.run_id)
    assert isinstance(evaluate(instance), dg.RunRequest)


def test_the_scheduled_run_brings_lost_webhooks_to_ground_truth(
    instance: dg.DagsterInstance,
    fal_sim: RunningSimulator,
    ledger_url: str,
    conn: psycopg.Connection,
) -> None:

    fal_sim.control.reset(seed=4, **FAST_TEST_OPTIONS, webhook_drop_rate=1.0, failure_rate=0.25)
    request_ids = [
        _submit_generation(
            conn,
            lambda e, i: fal_client.submit(e, arguments=i).request_id,
            user_id=1,
            endpoint=SEEDANCE,
            inputs={"prompt": f"p {uuid.uuid4().hex[:6]}", "duration": "5"},
        )
        for _ in range(8)
    ]
    truths = {r: fal_sim.control.wait_finished(r)["status"] for r in request_ids}
    conn.execute(
        "update generations set created_at = created_at - interval '20 minutes' "
        "where request_id = any(%s)",
        (request_ids,),
    )
    conn.commit()

    request = evaluate(instance)
    assert isinstance(request, dg.RunRequest)
    result = reconcile_ledger.execute_in_process(
        instance=instance,
        run_config=request.run_config,
        tags=request.tags,
        resources={"ledger": LedgerDatabase(url=ledger_url), "fal": fal_connection()},
    )
    assert result.success
    rows = conn.execute(
        "select request_id, status::text as status from generations where request_id = any(%s)",
        (request_ids,),
    ).fetchall()
    assert {r["request_id"]: r["status"] for r in rows} == truths

    figures = result.output_for_node("reconcile_open_rows")
    failed = sum(status == "failed" for status in truths.values())
    assert figures["rows_examined"] == 8
    assert figures["rows_advanced"] == 8
    assert figures["failed"] == failed
    assert figures["results_fetched"] >= 8 - failed
    assert figures["still_open"] == 0
    # the same figures are the run's metadata, with a readable table
    (output,) = [e for e in result.all_node_events if e.event_type_value == "STEP_OUTPUT"]
    metadata = output.event_specific_data.metadata
    assert metadata["rows_examined"].value == 8
    assert "| rows advanced | 8 |" in metadata["summary"].value
    assert isinstance(metadata["seconds"].value, float)
