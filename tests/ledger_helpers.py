"""Small helpers the ledger tests share."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from renderqueue_pipeline.ledger import Intent, record_intent, record_submitted

SEEDANCE = "bytedance/seedance-2.0/text-to-video"


def video_payload(seconds: float = 5, url: str | None = None) -> dict[str, Any]:
    """A text-to-video result in fal's shape, with the output's real duration."""
    return {
        "video": {
            "url": url or f"https://v3b.fal.media/files/b/{uuid.uuid4().hex}/output.mp4",
            "content_type": "video/mp4",
            "file_name": "output.mp4",
            "file_size": 13638187,
            "duration": seconds,
        },
        "seed": 123,
    }


def submit_row(
    conn: psycopg.Connection,
    request_id: str | None = None,
    *,
    user_id: int = 7,
    endpoint: str = SEEDANCE,
    inputs: dict[str, Any] | None = None,
) -> tuple[str, Intent]:
    """Record an intent and its generation row as the submit path does; commit."""
    request_id = request_id or f"req-{uuid.uuid4().hex}"
    inputs = inputs or {"prompt": "a red fox in snow", "duration": "5", "resolution": "720p"}
    with conn.transaction():
        intent = record_intent(conn, user_id=user_id, endpoint=endpoint, inputs=inputs)
    record_submitted(conn, intent, request_id)
    return request_id, intent


def generation(conn: psycopg.Connection, request_id: str) -> dict[str, Any] | None:
    return conn.execute("select * from generations where request_id = %s", (request_id,)).fetchone()
