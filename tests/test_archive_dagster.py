"""The archive's Dagster layer on a real instance with Postgres storage."""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pytest
from archive_helpers import Behaviour, completed_row, media_server, video

from renderqueue_pipeline.db.server import sqlalchemy_url
from renderqueue_pipeline.definitions import defs as load_defs
from renderqueue_pipeline.defs.archive.checks import archive_backlog_is_fresh
from renderqueue_pipeline.defs.archive.resources import ArchiveResource
from renderqueue_pipeline.defs.archive.sensors import archive_sensor
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.settings import load_settings


@pytest.fixture
def instance(make_database) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance on its own fresh Postgres database (no runs from other tests)."""
    storage = sqlalchemy_url(make_database(), driver="psycopg2")
    with dg.instance_for_test(overrides={"storage": {"postgres": {"postgres_url": storage}}}) as i:
        yield i


@pytest.fixture
def origin():
    with media_server("127.0.0.1") as server:
        yield server


@pytest.fixture
def archive_env(ledger_env, origin, archive_root, settings_env) -> str:

    settings_env(
        RENDERQUEUE_ARCHIVE_LOOPBACK_HOSTS=origin.netloc, RENDERQUEUE_ARCHIVE_BATCH_ROWS="7"
    )
    return ledger_env


def test_the_code_location_has_the_archive_job_sensor_and_checks() -> None:
    definitions = load_defs()
    assert definitions.resolve_job_def("archive_outputs") is not None
    sensor = definitions.resolve_sensor_def("archive_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    job = definitions.resolve_job_def("archive_outputs")
    checks = {key.name for key in job.asset_layer.asset_graph.asset_check_keys}
    assert checks == {"no_outputs_lost", "archive_backlog_is_fresh", "no_outputs_near_deadline"}
    assert job.tags.get("renderqueue/archive") == "run"


def test_the_sensor_launches_one_bounded_run_only_when_rows_are_due(
    conn, archive_env, instance, origin
) -> None:
    ledger = LedgerDatabase(url=archive_env)
    resources = {"ledger": ledger, "archive": ArchiveResource.from_settings(load_settings())}
    context = dg.build_sensor_context(instance=instance, resources=resources)
    skipped = archive_sensor(context)
    assert isinstance(skipped, dg.SkipReason)
    assert "no completed output" in skipped.skip_message

    completed_row(conn, video(origin.serve("/d.mp4", Behaviour(size=10)), 10))
    result = archive_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    (request,) = result.run_requests
    assert request.run_config["ops"]["archived_outputs"]["config"]["limit"] == 7

    # an archive run in flight: the sensor waits for it instead of piling up runs
    definitions = load_defs()
    job = definitions.resolve_job_def("archive_outputs")
    instance.create_run_for_job(
        job, run_config=request.run_config, status=dg.DagsterRunStatus.STARTED
    )
    waiting = archive_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert isinstance(waiting, dg.SkipReason)
    assert "in flight" in waiting.skip_message


def test_a_canceling_archive_run_is_still_in_flight(conn, archive_env, instance, origin) -> None:
    """Its op may still be copying: a second run would race it for the same rows."""
    ledger = LedgerDatabase(url=archive_env)
    completed_row(conn, video(origin.serve("/d.mp4", Behaviour(size=10)), 10))
    job = load_defs().resolve_job_def("archive_outputs")
    instance.create_run_for_job(job, status=dg.DagsterRunStatus.CANCELING)
    resources = {"ledger": ledger, "archive": ArchiveResource.from_settings(load_settings())}
    waiting = archive_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert isinstance(waiting, dg.SkipReason)
    assert "in flight" in waiting.skip_message


def test_the_job_archives_reports_metadata_and_checks_lost_outputs(
    conn, archive_env, instance, origin, tmp_path
) -> None:
    size = 256 * 1024
    completed_row(conn, video(origin.serve("/ok.mp4", Behaviour(size=size)), size))
    completed_row(
        conn, video(origin.serve("/gone.mp4", Behaviour(status=404)), 10), expires_in="-1 hour"
    )
    completed_row(
        conn, video(origin.serve("/flaky.mp4", Behaviour(status=502)), 10), expires_in="2 hours"
    )
    job = load_defs().resolve_job_def("archive_outputs")
    result = job.execute_in_process(
        instance=instance,
        resources={"ledger": LedgerDatabase(url=archive_env)},
        raise_on_error=False,
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("archived_outputs")
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    assert metadata["archived"] == 1
    assert metadata["bytes"] == size
    assert metadata["lost"] == 1
    assert metadata["retrying"] == 1
    assert metadata["failures_by_reason"] == {"gone": 1, "http_error": 1}
    assert metadata["mb_per_second"] > 0
    # what one run archived is not the table's row count, which the UI would show as such
    assert "dagster/row_count" not in metadata
    assert "dagster/partition_row_count" not in metadata

    checks = {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    assert checks["no_outputs_lost"].passed is False
    assert checks["no_outputs_lost"].metadata["lost"].value == 1
    assert checks["no_outputs_near_deadline"].passed is False  # the 502 row expires in 2 h
    assert checks["archive_backlog_is_fresh"].passed is True
    assert (tmp_path / "archive" / "generations").is_dir()


def test_the_backlog_check_alerts_when_the_oldest_row_waits_too_long(
    conn, archive_env, instance, origin, monkeypatch
) -> None:

    rid = completed_row(conn, video(origin.url("/old.mp4"), 10))
    conn.execute(
        "update generations set finished_at = now() - interval '45 minutes' where request_id = %s",
        (rid,),
    )
    conn.commit()
    ledger = LedgerDatabase(url=archive_env)
    result = archive_backlog_is_fresh(
        ledger=ledger, archive=ArchiveResource.from_settings(load_settings())
    )
    assert result.passed is False
    assert result.metadata["oldest_pending_age_minutes"].value >= 45
    monkeypatch.setenv("RENDERQUEUE_ARCHIVE_ALERT_MINUTES", "60")
    archive = ArchiveResource.from_settings(load_settings())  # the environment, read now
    assert archive_backlog_is_fresh(ledger=ledger, archive=archive).passed is True
