"""Dagster's own instance storage: a `dagster` database on the ledger's Postgres server.

Never SQLite: runs, event logs and schedules live in Postgres through dagster-postgres, so
the webserver, the daemon and run workers on other machines share them.
"""

from __future__ import annotations

import os
from pathlib import Path

from renderqueue_pipeline.db.server import database_url, ensure_database, sqlalchemy_url
from renderqueue_pipeline.settings import get_settings

DAGSTER_DATABASE = "dagster"


def dagster_storage_url(ledger_url: str | None = None) -> str:
    """A psycopg2 SQLAlchemy URL for Dagster's database (created if missing)."""
    url = ensure_database(ledger_url or database_url(), DAGSTER_DATABASE)
    return sqlalchemy_url(url, driver="psycopg2")


def dagster_yaml(storage_url: str) -> str:
    """The instance config: Postgres storage, and no telemetry."""
    return (
        "storage:\n"
        "  postgres:\n"
        f'    postgres_url: "{storage_url}"\n'
        "telemetry:\n"
        "  enabled: false\n"
        "run_coordinator:\n"
        "  module: dagster.core.run_coordinator\n"
        "  class: QueuedRunCoordinator\n"
    )


def ensure_dagster_home(ledger_url: str | None = None) -> Path:
    """Write `$RENDERQUEUE_HOME/dagster/dagster.yaml` (when it changed) and set DAGSTER_HOME."""
    home = get_settings().home_dir / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    text = dagster_yaml(dagster_storage_url(ledger_url))
    if not config.exists() or config.read_text() != text:
        config.write_text(text)
    os.environ["DAGSTER_HOME"] = str(home)
    return home
