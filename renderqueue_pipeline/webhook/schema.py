"""Whether the ledger's schema is the one this receiver was built for.

The receiver does not migrate (it runs as `renderqueue_receiver`, which may not): migrations
are their own step, `renderqueue db migrate`. Until the database holds every migration of
this code's sql/ folder, deliveries get 503 with Retry-After (fal retries them) and
/healthz says why. A database that also holds newer migrations (a newer release migrated
first, during a rolling deploy) is current. Once current, it is never asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import psycopg

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.migrate import Migration, load_migrations, missing_migrations
from renderqueue_pipeline.errors import DatabaseUnavailable
from renderqueue_pipeline.webhook.committer import describe, open_connection

log = logging.getLogger("renderqueue.webhook")


class SchemaGate:
    """The schema check: at start, then for each delivery until current.

    While behind, a delivery is answered from a check that finished after it arrived, so
    the first delivery after `renderqueue db migrate` is accepted; deliveries arriving
    while a check runs share the next one (one connection, one check in flight, however
    many deliveries wait). Once current, the database is never asked again.
    """

    def __init__(self, url: str, migrations: list[Migration] | None = None) -> None:
        self._url = url
        self._migrations = load_migrations() if migrations is None else migrations
        self._lock = asyncio.Lock()
        self._checked_at = float("-inf")
        self._conn: LedgerConnection | None = None
        self.ready = False
        #: why not ready, for /healthz: "database_unavailable" or "migrations_missing"
        self.reason: str | None = "not_checked"
        self.missing: list[str] = []
        self.checks = 0

    async def check(self) -> bool:
        """True once the schema is current (then without touching the database again)."""
        if self.ready:
            return True
        arrived = time.monotonic()
        async with self._lock:
            if not self.ready and self._checked_at <= arrived:
                await asyncio.to_thread(self._read)
                self._checked_at = time.monotonic()
        return self.ready

    def _read(self) -> None:
        self.checks += 1
        try:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = open_connection(self._url, statement_timeout=2.0)
            missing = missing_migrations(self._conn, self._migrations)
        except (psycopg.Error, DatabaseUnavailable) as exc:
            if self.reason != "database_unavailable":
                log.error("schema check failed: %s", describe(exc))
            self.close()
            self.reason, self.missing = "database_unavailable", []
            return
        if missing:
            if self.reason != "migrations_missing":
                log.error(
                    "the ledger database lacks %d migration(s) of this release (first: %s): "
                    "answering 503 until `renderqueue db migrate` has run",
                    len(missing),
                    missing[0],
                )
            self.reason, self.missing = "migrations_missing", missing
            return
        if self.reason == "migrations_missing":
            log.info("the ledger database is migrated: accepting deliveries")
        self.close()
        self.ready, self.reason, self.missing = True, None, []

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def outcome(self) -> str:
        """The 503's outcome while not ready: the schema, or (unreadable) the database."""
        if self.reason == "migrations_missing":
            return "schema_not_current"
        return "database_unavailable"

    def health(self) -> dict[str, object]:
        """What /healthz says while not ready (migration names are ours: no database text)."""
        if self.reason == "migrations_missing":
            return {
                "schema": "migrations_missing",
                "missing_migrations": len(self.missing),
                "first_missing": self.missing[0],
                "fix": "renderqueue db migrate",
            }
        return {"schema": "unknown", "database": "unavailable"}
