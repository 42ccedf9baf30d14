"""Group commit: concurrent deliveries share one transaction per short window.

Each delivery waits for the commit that contains its event and only then is answered, so
nothing is acknowledged before it is durable, but the receiver is not capped at one fsync
per webhook.

A flusher is a THREAD with its own psycopg connection (autocommit). When events are
queued it waits `max_wait` for a burst to gather, takes up to `max_batch` of them and
stores them with ONE statement, `rq_record_events` (sql/003_state_machine.sql): the
ledger's state machine over every event, in request_id order, inside that statement's own
transaction. The database round trip runs outside the event loop (psycopg waits with the
GIL released), so the next batch starts as soon as a commit returns, not when the busy
loop gets to it; the loop is woken once per batch to answer that batch's deliveries.

One flusher is the default: with one commit in flight, the next batch is everything that
arrived meanwhile, so batches stay large and Postgres does the least work per event
(on 2 cores, `RENDERQUEUE_WEBHOOK_FLUSHERS=2 python -m bench webhook`
measured 2 flushers ~15% slower). More flushers help when
Postgres has cores to spare.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg.rows import dict_row

from renderqueue_pipeline.db.server import psycopg_url
from renderqueue_pipeline.errors import DatabaseUnavailable
from renderqueue_pipeline.ledger import EventOutcome, LedgerEvent, record_events

log = logging.getLogger(__name__)

# fal gives a delivery 15 s (fal-wire.md): a batch stuck longer (a row lock held elsewhere)
# is cancelled so its deliveries get a 503 and a retry, not a timeout.
DEFAULT_COMMIT_TIMEOUT = 10.0


class EventNotStorable(Exception):
    """Postgres refused this one event's content (e.g. a NUL escape that jsonb rejects)."""


@dataclass
class _Pending:
    event: LedgerEvent
    future: asyncio.Future[EventOutcome] = field(repr=False)


class _Flusher:
    """One flusher's connection, opened on first use and again after it broke."""

    def __init__(self, url: str, statement_timeout: float) -> None:
        self._url = url
        self._options = f"-c statement_timeout={max(1, round(statement_timeout * 1000))}"
        self._conn: psycopg.Connection | None = None

    def connection(self) -> psycopg.Connection:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            try:
                conn = psycopg.Connection.connect(
                    psycopg_url(self._url),
                    autocommit=True,
                    row_factory=dict_row,
                    options=self._options,
                )
            except psycopg.OperationalError as exc:
                raise DatabaseUnavailable(
                    f"cannot reach the ledger database: {exc}".strip()
                ) from exc
            self._conn = conn
        return conn

    def drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()


class GroupCommitter:
    """Queue events from many requests; store and apply them in shared transactions."""

    def __init__(
        self,
        database_url: str,
        *,
        max_batch: int = 256,
        max_wait: float = 0.0005,
        flushers: int = 1,
        commit_timeout: float = DEFAULT_COMMIT_TIMEOUT,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self._url = database_url
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._flushers = flushers
        self._commit_timeout = commit_timeout
        self._on_commit = on_commit  # (events in the batch, seconds its statement took)
        self._pending: collections.deque[_Pending] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.committed = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._threads = [
            threading.Thread(
                target=self._flush_loop,
                args=(_Flusher(self._url, self._commit_timeout),),
                name=f"flusher-{i}",
                daemon=True,
            )
            for i in range(self._flushers)
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        self._threads = []

    async def submit(self, event: LedgerEvent) -> EventOutcome:
        """Store and apply `event`; returns once its transaction has committed."""
        assert self._loop is not None, "GroupCommitter.start() was not awaited"
        future: asyncio.Future[EventOutcome] = self._loop.create_future()
        with self._ready:
            if self._stopping:  # no flusher would take it: fal retries against a live one
                raise DatabaseUnavailable("the receiver is shutting down")
            self._pending.append(_Pending(event, future))
            self._ready.notify()
        return await future

    def _next_batch(self) -> list[_Pending] | None:
        """The next batch; None once stopping and nothing is left (the queue drains first)."""
        with self._ready:
            while not self._pending:
                if self._stopping:
                    return None
                self._ready.wait()
            if len(self._pending) < self._max_batch and self._max_wait > 0:
                self._ready.release()  # let a burst gather
                try:
                    time.sleep(self._max_wait)
                finally:
                    self._ready.acquire()
            take = min(len(self._pending), self._max_batch)
            return [self._pending.popleft() for _ in range(take)]

    def _flush_loop(self, flusher: _Flusher) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                began = time.perf_counter()
                try:
                    result: list[EventOutcome | Exception] | Exception = self._commit(
                        flusher, [p.event for p in batch]
                    )
                except Exception as exc:  # every delivery of the batch learns it was not stored
                    result = exc
                seconds = time.perf_counter() - began
                with contextlib.suppress(RuntimeError):  # the loop closed under us
                    self._loop.call_soon_threadsafe(self._answer, batch, result, seconds)
        finally:
            flusher.drop()

    def _answer(
        self,
        batch: list[_Pending],
        result: list[EventOutcome | Exception] | Exception,
        seconds: float,
    ) -> None:
        """On the event loop: wake the deliveries of a committed (or failed) batch."""
        if isinstance(result, Exception):
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(result)
            return
        self.batches += 1
        self.committed += len(batch)
        if self._on_commit is not None:
            self._on_commit(len(batch), seconds)
        for pending, outcome in zip(batch, result, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, Exception):
                pending.future.set_exception(EventNotStorable(str(outcome).strip()))
            else:
                pending.future.set_result(outcome)

    def _commit(
        self, flusher: _Flusher, events: list[LedgerEvent]
    ) -> list[EventOutcome | Exception]:
        try:
            return list(record_events(flusher.connection(), events))
        except psycopg.errors.QueryCanceled as exc:  # the connection stays usable
            raise DatabaseUnavailable(
                f"storing {len(events)} event(s) took over {self._commit_timeout:g} s "
                "(a lock held elsewhere?); cancelled"
            ) from exc
        except psycopg.OperationalError as exc:
            flusher.drop()
            raise DatabaseUnavailable(str(exc).strip() or "database connection lost") from exc
        except psycopg.Error:
            # One bad event must not sink its neighbours: retry them one by one.
            return [self._commit_one(flusher, event) for event in events]

    def _commit_one(self, flusher: _Flusher, event: LedgerEvent) -> EventOutcome | Exception:
        try:
            return record_events(flusher.connection(), [event])[0]
        except psycopg.errors.QueryCanceled as exc:
            raise DatabaseUnavailable(
                f"storing the event took over {self._commit_timeout:g} s; cancelled"
            ) from exc
        except psycopg.OperationalError as exc:
            flusher.drop()
            raise DatabaseUnavailable(str(exc).strip()) from exc
        except psycopg.Error as exc:
            log.warning("event for request %s could not be stored: %s", event.request_id, exc)
            return exc
