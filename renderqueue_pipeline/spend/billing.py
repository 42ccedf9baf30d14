"""Loading fal's billing events into `fal_billing_events`, one time range at a time.

A range (a UTC day for the Dagster partition) is replaced in one transaction: delete the
range, then COPY every page the Platform API returns for it. Rerunning is idempotent, and
events fal published late simply appear on the next load of their day.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.fal_platform import FalPlatform

Progress = Callable[[int, int], None]  # (pages, events) so far
T = TypeVar("T")


class BillingDataError(RenderqueueError):
    """fal sent a billing event we cannot store; the message names the event and field."""


@dataclass(frozen=True)
class BillingLoad:
    """What one load stored."""

    start: dt.datetime
    end: dt.datetime
    pages: int
    events: int
    requests: int
    nano_usd: int

    @property
    def micros(self) -> int:
        return (self.nano_usd + 500) // 1000


def day_range(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """[00:00, next 00:00) UTC of a day."""
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def event_row(event: dict[str, Any]) -> tuple[Any, ...]:
    """One API record as a COPY row, values as fal sent them (Postgres parses and checks
    the numbers and the timestamp); a record missing a field is a clear error."""
    try:
        return (
            event["request_id"],
            event["endpoint_id"],
            event["timestamp"],
            event["output_units"],
            event["unit_price"],
            event.get("percent_discount"),
            event["cost_estimate_nano_usd"],
        )
    except (KeyError, TypeError) as exc:
        rid = event.get("request_id", "?") if isinstance(event, dict) else "?"
        raise BillingDataError(f"billing event of request {rid}: field {exc} missing") from None


def prefetched(pages: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Fetch the next pages in a thread while the caller writes this one (bounded: `depth`
    pages in memory). An error in the fetching thread is raised here, in order."""
    done = object()
    buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def fetch() -> None:
        try:
            for page in pages:
                if stop.is_set():
                    return
                buffer.put((page, None))
            buffer.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            buffer.put((done, exc))

    thread = threading.Thread(target=fetch, name="billing-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                buffer.get_nowait()
        thread.join(30)


def copy_events(
    cursor: psycopg.Cursor[Any],
    pages: Iterable[list[dict[str, Any]]],
    progress: Progress | None = None,
) -> tuple[int, int]:
    """COPY every event of every page; returns (pages, events)."""
    n_pages = n_events = 0
    with cursor.copy(q("spend_copy_billing_events")) as copy:
        for page in pages:
            for event in page:
                copy.write_row(event_row(event))
            n_pages += 1
            n_events += len(page)
            if progress:
                progress(n_pages, n_events)
    return n_pages, n_events


def load_billing_events(
    conn: LedgerConnection,
    platform: FalPlatform,
    start: dt.datetime,
    end: dt.datetime,
    *,
    page_size: int = 10_000,
    progress: Progress | None = None,
) -> BillingLoad:
    """Replace [start, end) of fal_billing_events with what fal reports now (one transaction)."""
    with conn.transaction(), conn.cursor() as cursor:
        cursor.execute(q("spend_delete_billing_range"), {"start": start, "end": end})
        pages = prefetched(platform.billing_event_pages(start, end, page_size=page_size))
        n_pages, _ = copy_events(cursor, pages, progress)
        totals = cursor.execute(
            q("spend_billing_range_totals"), {"start": start, "end": end}
        ).fetchone()
    if totals is None:  # pragma: no cover - an aggregate always returns one row
        raise RuntimeError("spend_billing_range_totals returned no row")
    row = (
        totals
        if isinstance(totals, dict)
        else dict(zip(("events", "requests", "nano_usd"), totals, strict=True))
    )
    return BillingLoad(start, end, n_pages, row["events"], row["requests"], row["nano_usd"])


def insert_events_row_by_row(conn: LedgerConnection, pages: Iterable[list[dict[str, Any]]]) -> int:
    """The naive baseline the benchmark compares with: one INSERT per event."""
    count = 0
    with conn.transaction(), conn.cursor() as cursor:
        sql = q("spend_insert_billing_event")
        for page in pages:
            for event in page:
                cursor.execute(sql, event_row(event))
                count += 1
    return count
