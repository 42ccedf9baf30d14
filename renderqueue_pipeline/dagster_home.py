"""Dagster's instance: a `dagster` database on the ledger's Postgres server, and its limits.

Never SQLite: runs, event logs and schedules live in Postgres through dagster-postgres, so
the webserver, the daemon and run workers on other machines share them. The same template
(`dagster_yaml`) is what `renderqueue demo` and `renderqueue dev` write into
`$RENDERQUEUE_HOME/dagster/dagster.yaml`; docs/dagster.md explains each limit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from renderqueue_pipeline.db.server import database_url, ensure_database, sqlalchemy_url
from renderqueue_pipeline.settings import get_settings

if TYPE_CHECKING:
    from dagster import DagsterInstance

DAGSTER_DATABASE = "dagster"

#: The pool every op that calls fal declares (`pool="fal_api"`).
FAL_API_POOL = "fal_api"

#: The tag each domain's jobs carry, so one domain cannot take every run slot.
DOMAIN_TAG = "renderqueue/domain"

#: The tag (value `run`) archive runs carry, so only one runs at a time.
ARCHIVE_TAG_KEY = "renderqueue/archive"


@dataclass(frozen=True)
class RunLimits:
    """The instance's limits; defaults suit one machine, env vars override them."""

    #: runs in progress at once (queued runs wait)
    max_concurrent_runs: int = 8
    #: fal-calling ops in progress at once across all runs (each op fans out on its own)
    fal_api_pool: int = 4
    #: runs of any one sensor in progress at once
    per_sensor: int = 2
    #: runs of any one schedule in progress at once (the reconciler never overlaps itself)
    per_schedule: int = 1
    #: runs of any one domain (`renderqueue/domain` tag) in progress at once
    per_domain: int = 4
    #: after a run ends (or is cancelled) the daemon frees pool slots it still holds
    free_slots_after_run_end_seconds: int = 300
    #: a run whose worker died is retried this many times (not on an op's own failure)
    max_run_retries: int = 2

    @classmethod
    def from_settings(cls) -> RunLimits:
        settings = get_settings()
        return cls(
            max_concurrent_runs=settings.dagster_max_concurrent_runs,
            fal_api_pool=settings.fal_api_pool_limit,
        )


def dagster_storage_url(ledger_url: str | None = None) -> str:
    """A psycopg2 SQLAlchemy URL for Dagster's database (created if missing); its name is
    RENDERQUEUE_DAGSTER_DATABASE (default `dagster`), so tests each get their own."""
    name = get_settings().dagster_database or DAGSTER_DATABASE
    url = ensure_database(ledger_url or database_url(), name)
    return sqlalchemy_url(url, driver="psycopg2")


def tag_concurrency_limits(limits: RunLimits) -> list[dict[str, Any]]:
    """Per sensor, per schedule and per domain: one of them cannot flood the run queue."""
    per_value = {"applyLimitPerUniqueValue": True}
    return [
        {"key": "dagster/sensor_name", "value": per_value, "limit": limits.per_sensor},
        {"key": "dagster/schedule_name", "value": per_value, "limit": limits.per_schedule},
        {"key": DOMAIN_TAG, "value": per_value, "limit": limits.per_domain},
        # the archive's runs (defs/archive/jobs.py ARCHIVE_TAG): one at a time
        {"key": ARCHIVE_TAG_KEY, "value": "run", "limit": 1},
    ]


def instance_config(storage_url: str, limits: RunLimits | None = None) -> dict[str, Any]:
    """The instance config as data (what dagster.yaml holds; tests load it into an instance)."""
    limits = limits or RunLimits()
    return {
        # SQLAlchemy 2.1 picks psycopg3 for a bare postgresql:// URL; dagster-postgres needs
        # psycopg2, so the URL names the driver (postgresql+psycopg2://).
        "storage": {"postgres": {"postgres_url": storage_url}},
        "telemetry": {"enabled": False},
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
        },
        "concurrency": {
            "runs": {
                "max_concurrent_runs": limits.max_concurrent_runs,
                "tag_concurrency_limits": tag_concurrency_limits(limits),
            },
            # Only fal_api is declared today, so the default limit is its limit; the pool is
            # also set explicitly by `apply_pool_limits` (`dagster instance concurrency set`).
            "pools": {"default_limit": limits.fal_api_pool, "granularity": "op"},
        },
        "run_monitoring": {
            "enabled": True,
            "start_timeout_seconds": 180,
            "cancel_timeout_seconds": 180,
            "poll_interval_seconds": 60,
            # without it a cancelled or crashed run keeps its fal_api slot forever
            "free_slots_after_run_end_seconds": limits.free_slots_after_run_end_seconds,
        },
        "run_retries": {
            "enabled": True,
            "max_retries": limits.max_run_retries,
            # a crashed worker is retried; an op that failed is not re-run blindly (its
            # rows are idempotent, but a failing input would just fail again)
            "retry_on_asset_or_op_failure": False,
        },
    }


def dagster_yaml(storage_url: str, limits: RunLimits | None = None) -> str:
    """The instance config as dagster.yaml text."""
    header = (
        "# Written by renderqueue (renderqueue_pipeline/dagster_home.py); edits are replaced.\n"
        "# Limits: see docs/dagster.md.\n"
    )
    return header + yaml.safe_dump(instance_config(storage_url, limits), sort_keys=False)


def apply_pool_limits(instance: DagsterInstance, limits: RunLimits | None = None) -> None:
    """Set the fal_api pool's slots in the instance (same as `dagster instance concurrency set`)."""
    limits = limits or RunLimits()
    instance.event_log_storage.set_concurrency_slots(FAL_API_POOL, limits.fal_api_pool)


def ensure_dagster_home(ledger_url: str | None = None) -> Path:
    """Write `$RENDERQUEUE_HOME/dagster/dagster.yaml` (when it changed) and set DAGSTER_HOME."""
    home = get_settings().home_dir / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    text = dagster_yaml(dagster_storage_url(ledger_url), RunLimits.from_settings())
    if not config.exists() or config.read_text() != text:
        config.write_text(text)
    os.environ["DAGSTER_HOME"] = str(home)
    return home
