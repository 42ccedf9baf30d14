"""Adopt what fal has: read fal's request list and name every request in the ledger.

A batch killed between fal's answer and our write, or a submit whose answer was lost and
that fal-client sent again, leaves requests at fal (billed) that no generations row names.
Every submit carries our tags (`rq_item`, `rq_user`, `rq_batch`: the gateway's
`RequestIdentity`), and fal's request list shows them. For each request listed on an
endpoint we use, `rq_adopt_fal_request` (sql/functions/adopt.sql) decides, in one place:

- `known`: a generations row has it already;
- `adopted`: its item was `pending` or `unknown`: the row is written with fal's request id,
  the item becomes `submitted`, and the webhook/status path finishes it;
- `duplicate`: its item already has another request: its own generations row
  (`duplicate_of`), cancelled by the reconciler while still queued;
- `orphan`: no tag of ours, or tags naming nothing: `fal_orphan_requests`, until explained.

Each endpoint's scan starts where the last one ended (`fal_request_scans`), minus a
bounded lookback (requests fal lists a little late, clocks that differ); the first scan
reads `first_window` back. fal's times are fal's clock: the window is wall-clock time
(`now=` for tests), not the ledger's injectable month clock.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from psycopg.types.json import Jsonb

from renderqueue_pipeline.db import LedgerConnection, one_row
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.fal_gateway import decode_tags

log = logging.getLogger("renderqueue.reconcile.adopt")

#: fal's request list keeps (and lets one ask for) at most this far back
MAX_LOOKBACK = dt.timedelta(days=90)


@dataclass
class AdoptReport:
    """What one read of fal's request list found and did."""

    endpoints: int = 0
    listed: int = 0
    known: int = 0  # already named (a generations row, or a recorded orphan)
    adopted: int = 0
    duplicates: int = 0
    duplicates_cancel_requested: int = 0
    orphans: int = 0
    unexplained_orphans: int = 0
    skipped: str | None = None
    adopted_items: list[int] = field(default_factory=list)

    def figures(self) -> dict[str, int]:
        return {
            "fal_requests_listed": self.listed,
            "fal_requests_adopted": self.adopted,
            "fal_duplicate_requests": self.duplicates,
            "fal_duplicates_cancel_requested": self.duplicates_cancel_requested,
            "fal_orphan_requests_new": self.orphans,
            "fal_orphan_requests_unexplained": self.unexplained_orphans,
        }


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def adopt_entry(
    conn: LedgerConnection,
    entry: dict[str, Any],
    endpoint: str,
    *,
    object_lifetime: float | None = None,
) -> dict[str, Any]:
    """Hand one entry of fal's request list to the ledger's decision; commit."""
    sent_at = _parse_time(entry.get("sent_at") or entry.get("created_at"))
    expires = (
        sent_at + dt.timedelta(seconds=object_lifetime)
        if sent_at is not None and object_lifetime is not None
        else None
    )
    params = {
        "request_id": str(entry["request_id"]),
        "endpoint": str(entry.get("endpoint_id") or endpoint),
        "tags": Jsonb(decode_tags(entry.get("tags"))),
        "fal_status": entry.get("status") or entry.get("state"),
        "sent_at": sent_at,
        "fal_expires_at": expires,
    }
    with conn.transaction():
        return one_row(conn.execute(q("adopt_fal_request"), params))


def adopt_entries(
    conn: LedgerConnection,
    entries: Iterable[dict[str, Any]],
    endpoint: str,
    report: AdoptReport,
    *,
    object_lifetime: float | None = None,
) -> int:
    """Adopt every entry; count outcomes into `report`; return how many were listed.

    Entries the ledger already names (a generations row or an orphan) are skipped a page
    at a time with one query, so re-reading the lookback costs little.
    """
    seen = 0
    for page in _pages(entries, PAGE):
        seen += len(page)
        with conn.transaction():
            ids = [str(e["request_id"]) for e in page]
            named = {r["request_id"] for r in conn.execute(q("named_requests"), {"ids": ids})}
        report.known += sum(1 for i in ids if i in named)
        for entry in page:
            if str(entry["request_id"]) not in named:
                _adopt_one(conn, entry, endpoint, report, object_lifetime)
    report.listed += seen
    return seen


PAGE = 100


def _pages(entries: Iterable[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    page: list[dict[str, Any]] = []
    for entry in entries:
        page.append(entry)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


def _adopt_one(
    conn: LedgerConnection,
    entry: dict[str, Any],
    endpoint: str,
    report: AdoptReport,
    object_lifetime: float | None,
) -> None:
    found = adopt_entry(conn, entry, endpoint, object_lifetime=object_lifetime)
    outcome = found["outcome"]
    if outcome == "adopted":
        report.adopted += 1
        report.adopted_items.append(found["item_id"])
        log.info("adopted fal request %s for item %s", entry["request_id"], found["item_id"])
    elif outcome == "duplicate":
        report.duplicates += 1
        log.warning("fal request %s: %s", entry["request_id"], found["reason"])
    elif outcome == "orphan" and found["reason"] is not None:  # None: recorded before
        report.orphans += 1
    else:
        report.known += 1


def adopt_fal_requests(
    conn: LedgerConnection,
    platform: Any,
    *,
    lookback: dt.timedelta = dt.timedelta(hours=1),
    first_window: dt.timedelta = dt.timedelta(hours=24),
    now: dt.datetime | None = None,
    endpoints: list[str] | None = None,
    object_lifetime: float | None = None,
) -> AdoptReport:
    """Read fal's request list of each endpoint we use since the last scan and adopt.

    `platform` is a `FalPlatform` (its `requests_by_endpoint`). Raises the platform's
    error when fal cannot be read: the scan position only moves after a full read.
    """
    now = now or dt.datetime.now(dt.UTC)
    report = AdoptReport()
    if endpoints is None:
        found = conn.execute(q("adopt_endpoints"), {"lookback": first_window}).fetchall()
        endpoints = [r["endpoint"] for r in found]
    positions = {
        r["endpoint"]: r["scanned_to"]
        for r in conn.execute(q("fal_scan_position"), {"endpoints": endpoints})
    }
    conn.commit()
    report.endpoints = len(endpoints)
    for endpoint in endpoints:
        last = positions.get(endpoint)
        start = (last - lookback) if last is not None else now - first_window
        start = max(start, now - MAX_LOOKBACK + dt.timedelta(seconds=1))
        if start >= now:
            continue
        entries = platform.requests_by_endpoint(endpoint, start, now)
        seen = adopt_entries(conn, entries, endpoint, report, object_lifetime=object_lifetime)
        with conn.transaction():
            conn.execute(
                q("save_fal_scan"), {"endpoint": endpoint, "scanned_to": now, "seen": seen}
            )
    report.unexplained_orphans = unexplained_orphan_count(conn)
    return report


def unexplained_orphan_count(conn: LedgerConnection) -> int:
    """Requests at fal on our endpoints that no item of ours explains, not yet explained."""
    with conn.transaction():
        return int(one_row(conn.execute(q("orphan_counts")))["unexplained"])


def unexplained_orphans(conn: LedgerConnection, limit: int = 100) -> list[dict[str, Any]]:
    with conn.transaction():
        return conn.execute(q("unexplained_orphans"), {"limit": limit}).fetchall()


def explain_orphan(conn: LedgerConnection, request_id: str, explanation: str) -> bool:
    """Mark one orphan explained, with the reason (who sent it, why it is fine); commit."""
    if not explanation or not explanation.strip():
        raise ValueError("explanation: say why this request at fal is accounted for")
    with conn.transaction():
        found = conn.execute(
            q("explain_orphan"),
            {"request_id": request_id, "explanation": explanation.strip()},
        ).fetchone()
    return found is not None


def duplicates_to_cancel(conn: LedgerConnection) -> list[dict[str, Any]]:
    with conn.transaction():
        return conn.execute(q("duplicates_to_cancel")).fetchall()
