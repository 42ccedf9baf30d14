"""Resources shared by every domain."""

from __future__ import annotations

import os

import psycopg
from dagster import ConfigurableResource, EnvVar

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.server import database_url


class LedgerDatabase(ConfigurableResource):
    """The ledger's Postgres; empty `url` means DATABASE_URL or the embedded server."""

    url: str = ""

    def resolved_url(self) -> str:
        return self.url or database_url()

    def connect(self) -> psycopg.Connection:
        return connect(self.resolved_url())


def default_resources() -> dict[str, object]:
    """Resources read from the environment (EnvVar keeps secrets out of the run config)."""

    ledger = (
        LedgerDatabase(url=EnvVar("DATABASE_URL"))
        if os.environ.get("DATABASE_URL")
        else LedgerDatabase()
    )
    return {"ledger": ledger}
