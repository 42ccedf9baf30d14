"""A hand-built ledger for the report tests: rows inserted directly, totals known exactly."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

KLING = "fal-ai/kling-video/v3/turbo/pro/text-to-video"  # $0.14/s, published price
KLING_MICROS_PER_SECOND = 140_000
VEO = "fal-ai/veo3.1"  # $0.40/s with audio (the default), published price
VEO_MICROS_PER_SECOND = 400_000
_ids = itertools.count(1)


def utc(*parts: int) -> datetime:
    """datetime(*parts) in UTC; microseconds allowed (23:59:59.999 is ...59, 999000)."""
    return datetime(*parts, tzinfo=UTC)


def add_generation(
    conn: psycopg.Connection,
    *,
    created_at: datetime,
    status: str,
    user_id: int = 1,
    endpoint: str = KLING,
    seconds: Decimal | int | None = None,
    cost_micros: int = 0,
    cost_basis: str | None = None,
    batch_item_id: int | None = None,
    archive_status: str = "none",
    request_id: str | None = None,
) -> str:
    """One generation row as the ledger would hold it; updated_at = created_at, so the row
    reads as quiet (unchanged since long before any report)."""
    request_id = request_id or f"rep-{next(_ids)}-{created_at:%Y%m%d%H%M%S%f}"
    if cost_basis is None:
        cost_basis = {
            "completed": "computed",
            "submitted": "estimate",
            "in_progress": "estimate",
        }.get(status, "none")
    finished = created_at if status in ("completed", "failed", "canceled") else None
    conn.execute(
        """insert into generations (request_id, user_id, endpoint, inputs, outputs, status,
                                    cost_micros, cost_basis, billed_seconds, batch_item_id,
                                    archive_status, created_at, finished_at, updated_at)
           values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
        (
            request_id,
            user_id,
            endpoint,
            Jsonb({"prompt": "a fox", "duration": str(seconds or 5)}),
            Jsonb({"video_url": f"https://v3b.fal.media/{request_id}.mp4"})
            if status == "completed"
            else None,
            status,
            cost_micros,
            cost_basis,
            seconds,
            batch_item_id,
            archive_status,
            created_at,
            finished,
            created_at,
        ),
    )
    return request_id


def add_batch(conn: psycopg.Connection, source: str) -> int:
    return conn.execute(
        "insert into batches (source, content_version) values (%s, 'v1') returning id", (source,)
    ).fetchone()["id"]


def add_item(conn: psycopg.Connection, batch_id: int | None, estimate_micros: int) -> int:
    return conn.execute(
        "insert into batch_items (batch_id, idempotency_key, estimate_micros, state)"
        " values (%s, %s, %s, 'submitted') returning id",
        (batch_id, f"item-{next(_ids)}", estimate_micros),
    ).fetchone()["id"]


def table(conn: psycopg.Connection, name: str, month: Any) -> list[dict]:
    """A report table's rows for a month, without computed_at (which changes per run)."""
    key = {
        "spend_daily": "day, endpoint",
        "spend_monthly_by_user": "user_id",
        "spend_monthly_by_endpoint": "endpoint",
        "spend_monthly_by_batch": "batch_id",
    }[name]
    rows = conn.execute(
        # names from the dict above
        f"select * from {name} where month = %s order by {key}",  # noqa: S608
        (month,),
    ).fetchall()
    return [{k: v for k, v in r.items() if k != "computed_at"} for r in rows]
