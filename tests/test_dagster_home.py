"""The dagster.yaml template, loaded into a real Dagster instance with Postgres storage."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, DagsterRun
from dagster._utils.tags import TagConcurrencyLimitsCounter

from renderqueue_pipeline.dagster_home import (
    DOMAIN_TAG,
    FAL_API_POOL,
    RunLimits,
    apply_pool_limits,
    dagster_storage_url,
    dagster_yaml,
    ensure_dagster_home,
)


@pytest.fixture
def dagster_home(ledger_env: str, settings_env: Callable[..., None]) -> Path:
    """`ensure_dagster_home` on the test server, with two limits set through the env."""
    settings_env(RENDERQUEUE_DAGSTER_MAX_RUNS="5", RENDERQUEUE_FAL_API_POOL="3", DAGSTER_HOME=None)
    return ensure_dagster_home(ledger_env)


def _run(instance: DagsterInstance, tags: dict[str, str]) -> DagsterRun:
    return DagsterRun(job_name="some_job", tags=tags)


def test_the_written_home_is_a_postgres_instance_with_the_documented_limits(
    dagster_home: Path,
) -> None:

    assert os.environ["DAGSTER_HOME"] == str(dagster_home)
    config = yaml.safe_load((dagster_home / "dagster.yaml").read_text())
    url = config["storage"]["postgres"]["postgres_url"]
    assert url.startswith("postgresql+psycopg2://")  # SQLAlchemy 2.1 needs the driver named

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"

        concurrency = instance.get_concurrency_config()
        queue = concurrency.run_queue_config
        assert queue.max_concurrent_runs == 5  # RENDERQUEUE_DAGSTER_MAX_RUNS
        assert concurrency.pool_config.default_pool_limit == 3  # RENDERQUEUE_FAL_API_POOL
        assert concurrency.pool_config.pool_granularity.value == "op"

        apply_pool_limits(instance, RunLimits.from_settings())
        assert instance.event_log_storage.get_concurrency_info(FAL_API_POOL).slot_count == 3

        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 300
        assert instance.run_retries_enabled
        assert instance.run_retries_max_retries == 2
        assert not instance.run_retries_retry_on_asset_or_op_failure


def test_one_schedule_or_sensor_cannot_flood_the_run_queue(dagster_home: Path) -> None:
    """The queue's own counter, fed the instance's limits, blocks the run past each limit."""
    limits = RunLimits()
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        tag_limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits

        def blocked(in_progress: list[dict[str, str]], candidate: dict[str, str]) -> bool:
            runs = [_run(instance, tags) for tags in in_progress]
            counter = TagConcurrencyLimitsCounter(tag_limits, runs)
            return counter.is_blocked(_run(instance, candidate))

        reconcile = {"dagster/schedule_name": "reconcile_every_5m"}
        archive = {"dagster/schedule_name": "archive_every_hour"}
        # the same schedule never has two runs in progress; another schedule is not blocked
        assert limits.per_schedule == 1
        assert blocked([reconcile], reconcile)
        assert not blocked([reconcile], archive)

        inbox = {"dagster/sensor_name": "prompts_inbox_sensor"}
        assert not blocked([inbox] * (limits.per_sensor - 1), inbox)
        assert blocked([inbox] * limits.per_sensor, inbox)
        assert not blocked([inbox] * limits.per_sensor, {"dagster/sensor_name": "other"})

        archive_run = {"renderqueue/archive": "run"}
        assert blocked([archive_run], archive_run)

        batch = {DOMAIN_TAG: "batch"}
        assert blocked([batch] * limits.per_domain, batch)
        assert not blocked([batch] * limits.per_domain, {DOMAIN_TAG: "reconcile"})


def test_the_template_is_rewritten_only_when_it_changes(dagster_home: Path, ledger_env) -> None:
    config = dagster_home / "dagster.yaml"
    before = config.stat().st_mtime_ns
    ensure_dagster_home(ledger_env)
    assert config.stat().st_mtime_ns == before
    assert config.read_text() == dagster_yaml(
        dagster_storage_url(ledger_env), RunLimits.from_settings()
    )
