"""Group commit: concurrent deliveries share one transaction per short window.

Each delivery waits for the commit that contains its event and only then is answered, so
nothing is acknowledged before it is durable, but the receiver is not capped at one fsync
per webhook. A batch closes when it holds `max_batch` events or `max_wait` seconds after
its first event arrived, whichever comes first; `flushers` batches may commit at once.

Each flusher owns one async psycopg connection (autocommit) on the event loop and stores
a batch with ONE statement, `rq_record_events` (sql/006): the ledger's state machine over
every event, in request_id order, inside that statement's own transaction, so a batch costs
one round trip and one commit instead of a statement per event plus BEGIN and COMMIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg.rows import dict_row

from renderqueue_pipeline.db.server import psycopg_url
from renderqueue_pipeline.errors import DatabaseUnavailable
from renderqueue_pipeline.ledger import EventOutcome, LedgerEvent, arecord_events

log = logging.getLogger(__name__)


class EventNotStorable(Exception):
    """Postgres refused this one event's content (e.g. a NUL escape that jsonb rejects)."""


@dataclass
class _Pending:
    event: LedgerEvent
    future: asyncio.Future[EventOutcome] = field(repr=False)


class _Flusher:
    """One flusher's connection, opened on first use and again after it broke."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.AsyncConnection | None = None

    async def connection(self) -> psycopg.AsyncConnection:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    psycopg_url(self._url), autocommit=True, row_factory=dict_row
                )
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable(
                    f"cannot reach the ledger database: {exc}".strip()
                ) from exc
            self._conn = conn
        return conn

    async def drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()


class GroupCommitter:
    """Queue events from many requests; store and apply them in shared transactions."""

    def __init__(
        self,
        database_url: str,
        *,
        max_batch: int = 256,
        max_wait: float = 0.0005,
        flushers: int = 2,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self._url = database_url
        self._on_commit = on_commit  # (events in the batch, seconds its statement took)
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._flushers = flushers
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0
        self.committed = 0

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._flush_loop(_Flusher(self._url)))
            for _ in range(self._flushers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def submit(self, event: LedgerEvent) -> EventOutcome:
        """Store and apply `event`; returns once its transaction has committed."""
        future: asyncio.Future[EventOutcome] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(event, future))
        return await future

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self._max_wait
        while len(batch) < self._max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _flush_loop(self, flusher: _Flusher) -> None:
        try:
            while True:
                batch = await self._next_batch()
                began = time.perf_counter()
                try:
                    outcomes = await self._commit(flusher, [p.event for p in batch])
                except Exception as exc:  # every delivery of the batch learns it was not stored
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(exc)
                    continue
                self.batches += 1
                self.committed += len(batch)
                if self._on_commit is not None:
                    self._on_commit(len(batch), time.perf_counter() - began)
                for pending, outcome in zip(batch, outcomes, strict=True):
                    if pending.future.done():
                        continue
                    if isinstance(outcome, Exception):
                        pending.future.set_exception(EventNotStorable(str(outcome).strip()))
                    else:
                        pending.future.set_result(outcome)
        finally:
            await asyncio.shield(flusher.drop())

    async def _commit(
        self, flusher: _Flusher, events: list[LedgerEvent]
    ) -> list[EventOutcome | Exception]:
        try:
            conn = await flusher.connection()
            return list(await arecord_events(conn, events))
        except psycopg.OperationalError as exc:
            await flusher.drop()
            raise DatabaseUnavailable(str(exc).strip() or "database connection lost") from exc
        except psycopg.Error:
            # One bad event must not sink its neighbours: retry them one by one.
            return [await self._commit_one(flusher, event) for event in events]

    async def _commit_one(
        self, flusher: _Flusher, event: LedgerEvent
    ) -> EventOutcome | Exception:
        conn = await flusher.connection()
        try:
            return (await arecord_events(conn, [event]))[0]
        except psycopg.OperationalError as exc:
            await flusher.drop()
            raise DatabaseUnavailable(str(exc).strip()) from exc
        except psycopg.Error as exc:
            log.warning("event for request %s could not be stored: %s", event.request_id, exc)
            return exc
