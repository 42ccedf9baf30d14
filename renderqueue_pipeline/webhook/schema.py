"""Whether the ledger's schema is the one this receiver was built for.

The receiver does not migrate (it runs as `renderqueue_receiver`, which may not): migrations
are their own step, `renderqueue db migrate`. Until the database holds every migration of
this code's sql/ folder, deliveries get 503 with Retry-After (fal retries them) and
/healthz says why. A database that also holds newer migrations (a newer release migrated
first, during a rolling deploy) is current. Once current, it is never asked again.
"""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg

from renderqueue_pipeline.db.migrate import Migration, load_migrations, missing_migrations
from renderqueue_pipeline.errors import DatabaseUnavailable
from renderqueue_pipeline.webhook.committer import describe, open_connection

log = logging.getLogger("renderqueue.webhook")

#: seconds between two checks while the schema is behind (whatever the delivery rate)
CHECK_INTERVAL = 1.0


class SchemaGate:
    """The schema check: at start, then at most once per `interval` until current."""

    def __init__(
        self,
        url: str,
        migrations: list[Migration] | None = None,
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self._url = url
        self._migrations = load_migrations() if migrations is None else migrations
        self._interval = interval
        self._lock = asyncio.Lock()
        self._at = float("-inf")
        self.ready = False
        #: why not ready, for /healthz: "database_unavailable" or "migrations_missing"
        self.reason: str | None = "not_checked"
        self.missing: list[str] = []
        self.checks = 0

    async def check(self) -> bool:
        """True once the schema is current (then without touching the database again)."""
        if self.ready:
            return True
        async with self._lock:
            if not self.ready and time.monotonic() - self._at >= self._interval:
                await asyncio.to_thread(self._read)
                self._at = time.monotonic()
        return self.ready

    def _read(self) -> None:
        self.checks += 1
        try:
            with open_connection(self._url, statement_timeout=2.0) as conn:
                missing = missing_migrations(conn, self._migrations)
        except (psycopg.Error, DatabaseUnavailable) as exc:
            log.error("schema check failed: %s", describe(exc))
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
        self.ready, self.reason, self.missing = True, None, []

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
