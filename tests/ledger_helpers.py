"""Small helpers the ledger tests share."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from renderqueue_pipeline.defs.resources import FalConnection
from renderqueue_pipeline.ledger import Intent, record_intent, record_submitted
from renderqueue_pipeline.settings import load_settings

SEEDANCE = "bytedance/seedance-2.0/text-to-video"


def fal_from_env() -> FalConnection:
    """fal as the entry points configure it, from the test's environment read now: its
    `gateway` and `platform` are the domain's gateway_factory and platform_factory."""
    return FalConnection(load_settings())


# What fal documents for a text-to-video output (Seedance 2.0): nothing else, no duration.
DOCUMENTED_VIDEO_FIELDS = frozenset({"url", "content_type", "file_name", "file_size"})
DOCUMENTED_OUTPUT_FIELDS = frozenset({"video", "seed"})


def video_payload(seed: int = 123, url: str | None = None) -> dict[str, Any]:
    """A text-to-video result exactly in fal's documented shape."""
    return {
        "video": {
            "url": url or f"https://v3b.fal.media/files/b/{uuid.uuid4().hex}/output.mp4",
            "content_type": "video/mp4",
            "file_name": "output.mp4",
            "file_size": 13638187,
        },
        "seed": seed,
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
