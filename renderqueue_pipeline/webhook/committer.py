"""Group commit: concurrent deliveries share one transaction per short window.

Each delivery waits for the commit that contains its event and only then is answered, so
nothing is acknowledged before it is durable, but the receiver is not capped at one fsync
per webhook. A batch closes when it holds `max_batch` events or `max_wait` seconds after
its first event arrived, whichever comes first; `flushers` batches may commit at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import psycopg

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.errors import DatabaseUnavailable
from renderqueue_pipeline.ledger import EventOutcome, LedgerEvent, record_events

log = logging.getLogger(__name__)


class EventNotStorable(Exception):
    """Postgres refused this one event's content (e.g. a NUL escape that jsonb rejects)."""


@dataclass
class _Pending:
    event: LedgerEvent
    future: asyncio.Future[EventOutcome] = field(repr=False)


class GroupCommitter:
    """Queue events from many requests; store and apply them in shared transactions."""

    def __init__(
        self,
        database_url: str,
        *,
        max_batch: int = 256,
        max_wait: float = 0.002,
        flushers: int = 2,
    ) -> None:
        self._url = database_url
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._flushers = flushers
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._local = threading.local()
        self.batches = 0
        self.committed = 0

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._flush_loop()) for _ in range(self._flushers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def submit(self, event: LedgerEvent) -> EventOutcome:
        """Store and apply `event`; returns once its transaction has committed."""
        future: asyncio.Future[EventOutcome] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(event, future))
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

    async def _flush_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                outcomes = await asyncio.to_thread(self._commit, [p.event for p in batch])
            except Exception as exc:  # every delivery of the batch learns it was not stored
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            self.batches += 1
            self.committed += len(batch)
            for pending, outcome in zip(batch, outcomes, strict=True):
                if pending.future.done():
                    continue
                if isinstance(outcome, Exception):
                    pending.future.set_exception(EventNotStorable(str(outcome).strip()))
                else:
                    pending.future.set_result(outcome)

    def _connection(self) -> psycopg.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = connect(self._url)
            self._local.conn = conn
        return conn

    def _commit(self, events: list[LedgerEvent]) -> list[EventOutcome | Exception]:
        """Runs in a worker thread with that thread's own connection."""
        try:
            conn = self._connection()
            return list(record_events(conn, events))
        except psycopg.OperationalError as exc:
            self._drop_connection()
            raise DatabaseUnavailable(str(exc).strip() or "database connection lost") from exc
        except psycopg.Error:
            # One bad event must not sink its neighbours: retry them one by one.
            return [self._commit_one(event) for event in events]

    def _commit_one(self, event: LedgerEvent) -> EventOutcome | Exception:
        conn = self._connection()
        try:
            return record_events(conn, [event])[0]
        except psycopg.OperationalError as exc:
            self._drop_connection()
            raise DatabaseUnavailable(str(exc).strip()) from exc
        except psycopg.Error as exc:
            log.warning("event for request %s could not be stored: %s", event.request_id, exc)
            return exc

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                conn.close()
            finally:
                self._local.conn = None
