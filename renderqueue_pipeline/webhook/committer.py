"""Group commit: concurrent deliveries share one transaction per short window.

Each delivery waits for the commit that contains its event and only then is answered, so
nothing is acknowledged before it is durable, but the receiver is not capped at one fsync
per webhook.

A flusher is a THREAD with its own psycopg connection (autocommit). When events are
queued it waits `max_wait` for a burst to gather, takes up to `max_batch` of them and
stores them with ONE statement, `rq_record_events` (sql/functions/ledger.sql): the
ledger's state machine over every event, in request_id order, inside that statement's own
transaction. The database round trip runs outside the event loop (psycopg waits with the
GIL released), so the next batch starts as soon as a commit returns, not when the busy
loop gets to it; the loop is woken once per batch to answer that batch's deliveries.

One flusher is the default: with one commit in flight, the next batch is everything that
arrived meanwhile, so batches stay large and Postgres does the least work per event
(on 2 cores, `RENDERQUEUE_WEBHOOK_FLUSHERS=2 python -m bench webhook`
measured 2 flushers ~15% slower). More flushers help when
Postgres has cores to spare.

Whose fault is an error? fal does not retry a 4xx, so a 4xx for a genuine delivery is a
lost event. Only a content error (SQLSTATE class 22: data exception, e.g. a value out of
range) is the event's fault: `EventNotStorable`, 422. Everything else is ours and a 503
with Retry-After (`DatabaseUnavailable`): the database unreachable, read-only (a failover
to a standby), not migrated (undefined function or table), a missing privilege,
serialization failures and deadlocks, lock and statement timeouts, out of memory or disk.
On those the flusher drops its connection, so the next batch reconnects (and sees a
promoted primary, a reset `default_transaction_read_only`, new grants).

Bounded everywhere: the connection has `connect_timeout` and TCP keepalives, the queue of
deliveries waiting for a commit holds at most `max_pending` (beyond it: `Overloaded`, 503 at
once), and each delivery waits at most until its deadline (`DeadlineExceeded`, 503).
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
from typing import Final, Literal, TypeAlias

import psycopg
from psycopg.rows import dict_row
from typing_extensions import TypedDict  # closed=True (PEP 728): only these keys

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.db.server import psycopg_url
from renderqueue_pipeline.errors import DatabaseUnavailable
from renderqueue_pipeline.ledger import EventOutcome, LedgerEvent, record_events

log = logging.getLogger(__name__)

# fal gives a delivery 15 s (fal-wire.md): a batch stuck longer (a row lock held elsewhere)
# is cancelled so its deliveries get a 503 and a retry, not a timeout.
DEFAULT_COMMIT_TIMEOUT = 10.0
CONNECT_TIMEOUT_SECONDS = 3
DEFAULT_MAX_PENDING = 4096
#: outcome of a late retry (see app.py) for a request id we have no row for: not stored
UNKNOWN_REQUEST: Final = "unknown_request"
#: what a delivery learns: the ledger's outcome, or UNKNOWN_REQUEST (not stored)
CommitOutcome: TypeAlias = EventOutcome | Literal["unknown_request"]


class EventNotStorable(Exception):
    """Postgres refused this one event's content (SQLSTATE class 22): the request's fault."""


class Overloaded(DatabaseUnavailable):
    """Too many deliveries already wait for a commit: answer 503 now, fal retries later."""


class DeadlineExceeded(DatabaseUnavailable):
    """The delivery's commit did not finish before its deadline (under fal's 15 s)."""


def is_content_error(exc: BaseException) -> bool:
    """True when Postgres refused the data itself (class 22), not our database or schema."""
    state = getattr(exc, "sqlstate", None)
    return isinstance(state, str) and state.startswith("22")


def describe(exc: BaseException) -> str:
    """One line for the log: SQLSTATE and the first line of the message."""
    state = getattr(exc, "sqlstate", None)
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}[{state}]: {text}" if state else f"{type(exc).__name__}: {text}"


class LibpqOptions(TypedDict, closed=True):
    """The libpq parameters of a receiver connection (keywords of `psycopg.connect`)."""

    connect_timeout: int
    keepalives: int
    keepalives_idle: int
    keepalives_interval: int
    keepalives_count: int
    options: str


def connection_options(statement_timeout: float) -> LibpqOptions:
    """libpq options of a receiver connection: bounded connect, keepalives, statement cap."""
    return {
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "options": f"-c statement_timeout={max(1, round(statement_timeout * 1000))}",
    }


def open_connection(url: str, statement_timeout: float) -> LedgerConnection:
    """An autocommit connection for the receiver, or DatabaseUnavailable (no URL in it)."""
    try:
        return LedgerConnection.connect(
            psycopg_url(url),
            autocommit=True,
            row_factory=dict_row,
            **connection_options(statement_timeout),
        )
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"cannot reach the ledger database: {describe(exc)}") from exc


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(
            DeadlineExceeded("the commit did not finish before the delivery's deadline")
        )


@dataclass
class _Pending:
    event: LedgerEvent
    future: asyncio.Future[CommitOutcome] = field(repr=False)
    known_only: bool = False  # a late retry: store it only if its generation row exists


@dataclass
class FlusherState:
    """What /healthz reads instead of opening a connection."""

    last_ok: float | None = None  # monotonic time of the last successful commit
    last_error: float | None = None
    error: str | None = None


class _Flusher:
    """One flusher's connection, opened on first use and again after it broke."""

    def __init__(self, url: str, statement_timeout: float) -> None:
        self._url = url
        self._statement_timeout = statement_timeout
        self._conn: LedgerConnection | None = None

    def connection(self) -> LedgerConnection:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            conn = self._conn = open_connection(self._url, self._statement_timeout)
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
        max_pending: int = DEFAULT_MAX_PENDING,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self._url = database_url
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._flushers = flushers
        self._commit_timeout = commit_timeout
        self._max_pending = max_pending
        self._on_commit = on_commit  # (events in the batch, seconds its statement took)
        self._pending: collections.deque[_Pending] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.state = FlusherState()
        self.batches = 0
        self.committed = 0
        self.batch_sizes: list[int] = []  # the last few batch sizes (tests, diagnostics)

    @property
    def queued(self) -> int:
        return len(self._pending)

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

    async def submit(
        self, event: LedgerEvent, *, deadline: float | None = None, known_only: bool = False
    ) -> CommitOutcome:
        """Store and apply `event`; returns once its transaction has committed.

        `deadline` (loop time): past it the delivery gets DeadlineExceeded (a 503; the
        event may still commit, and fal's retry is then a duplicate). `known_only`: store
        the event only if its generation row exists, else the outcome is UNKNOWN_REQUEST.
        """
        if self._loop is None:
            raise RuntimeError("GroupCommitter.start() was not awaited")
        future: asyncio.Future[CommitOutcome] = self._loop.create_future()
        with self._ready:
            if self._stopping:  # no flusher would take it: fal retries against a live one
                raise DatabaseUnavailable("the receiver is shutting down")
            if len(self._pending) >= self._max_pending:
                raise Overloaded(f"{len(self._pending)} deliveries already wait for a commit")
            self._pending.append(_Pending(event, future, known_only))
            self._ready.notify()
        if deadline is None:
            return await future
        # one timer per delivery (cheaper than wait_for's extra task): past the deadline the
        # delivery is answered 503; a flusher that has not taken it yet skips it
        timer = self._loop.call_at(deadline, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _next_batch(self) -> list[_Pending] | None:
        """The next batch; None once stopping and nothing is left (the queue drains first)."""
        with self._ready:
            while True:
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
                batch = [self._pending.popleft() for _ in range(take)]
                # already answered 503 (deadline): fal retries it, do not store it now
                batch = [p for p in batch if not p.future.done()]
                if batch:
                    return batch

    def _flush_loop(self, flusher: _Flusher) -> None:
        loop = self._loop
        if loop is None:  # start() sets it before this thread runs
            raise RuntimeError("GroupCommitter.start() was not awaited")
        try:
            while (batch := self._next_batch()) is not None:
                began = time.perf_counter()
                try:
                    result: list[CommitOutcome | Exception] | Exception = self._commit(
                        flusher, batch
                    )
                    self.state.last_ok = time.monotonic()
                except Exception as exc:  # noqa: BLE001
                    # each delivery of the batch learns it was not stored
                    result = exc
                    self.state.last_error, self.state.error = time.monotonic(), describe(exc)
                seconds = time.perf_counter() - began
                with contextlib.suppress(RuntimeError):  # the loop closed under us
                    loop.call_soon_threadsafe(self._answer, batch, result, seconds)
        finally:
            flusher.drop()

    def _answer(
        self,
        batch: list[_Pending],
        result: list[CommitOutcome | Exception] | Exception,
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
        self.batch_sizes = [*self.batch_sizes[-999:], len(batch)]
        if self._on_commit is not None:
            self._on_commit(len(batch), seconds)
        for pending, outcome in zip(batch, result, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, Exception):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)

    def _ours(self, flusher: _Flusher, exc: psycopg.Error, what: str) -> DatabaseUnavailable:
        """A fault of our database: drop the connection (the next batch reconnects)."""
        flusher.drop()
        if isinstance(exc, psycopg.errors.QueryCanceled):
            return DatabaseUnavailable(
                f"storing {what} took over {self._commit_timeout:g} s (a lock held elsewhere?); "
                "cancelled"
            )
        return DatabaseUnavailable(f"storing {what} failed: {describe(exc)}")

    def _commit(self, flusher: _Flusher, batch: list[_Pending]) -> list[CommitOutcome | Exception]:
        conn = flusher.connection()
        known: set[str] | None = None
        if any(p.known_only for p in batch):
            ids = sorted({p.event.request_id for p in batch if p.known_only})
            try:
                rows = conn.execute(q("webhook_known_request_ids"), {"request_ids": ids})
                known = {row["request_id"] for row in rows.fetchall()}
            except psycopg.Error as exc:
                raise self._ours(flusher, exc, "a batch") from exc
        stored = [p for p in batch if not p.known_only or p.event.request_id in (known or ())]
        outcomes = self._store(flusher, [p.event for p in stored])
        by_pending = dict(zip(map(id, stored), outcomes, strict=True))
        return [by_pending.get(id(p), UNKNOWN_REQUEST) for p in batch]

    def _store(
        self, flusher: _Flusher, events: list[LedgerEvent]
    ) -> list[EventOutcome | Exception]:
        if not events:
            return []
        try:
            return list(record_events(flusher.connection(), events))
        except psycopg.Error as exc:
            if not is_content_error(exc) or len(events) == 1:
                if is_content_error(exc):
                    return [self._not_storable(events[0], exc)]
                raise self._ours(flusher, exc, f"{len(events)} event(s)") from exc
        # One bad event must not sink its neighbours: store them one by one.
        return [self._store_one(flusher, event) for event in events]

    def _store_one(self, flusher: _Flusher, event: LedgerEvent) -> EventOutcome | Exception:
        try:
            return record_events(flusher.connection(), [event])[0]
        except psycopg.Error as exc:
            if is_content_error(exc):
                return self._not_storable(event, exc)
            return self._ours(flusher, exc, "the event")

    @staticmethod
    def _not_storable(event: LedgerEvent, exc: psycopg.Error) -> EventNotStorable:
        log.warning("event for request %s could not be stored: %s", event.request_id, describe(exc))
        return EventNotStorable(f"Postgres refused the event's content (SQLSTATE {exc.sqlstate})")
