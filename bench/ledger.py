"""Ledger event throughput: group commit against one commit per event.

Applies fal completion events to existing rows through the ledger's one state machine
(`rq_record_event`), either one transaction per event (the baseline: what a receiver
without grouping does) or 64 events per transaction (`record_events`, what the webhook
receiver's group commit does). Same database, same rows, same run.
"""

from __future__ import annotations

import time
import uuid

from rich.console import Console
from rich.progress import track

from bench.common import Figure, scaled, scratch_ledger
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.ledger import LedgerEvent, record_event, record_events

EVENTS = scaled(4000, 200)
GROUP = 64
ENDPOINT = "bytedance/seedance-2.0/text-to-video"


def _rows(conn, n: int) -> list[str]:
    ids = [f"bench-{uuid.uuid4().hex}" for _ in range(n)]
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "insert into generations (request_id, user_id, endpoint, inputs) "
            'values (%s, 1, %s, \'{"prompt": "p", "duration": "5"}\')',
            [(i, ENDPOINT) for i in ids],
        )
    return ids


def _event(request_id: str) -> LedgerEvent:
    payload = {"video": {"url": f"https://v3b.fal.media/files/{request_id}.mp4", "duration": 5}}
    return LedgerEvent(request_id, "completed", payload)


def run(console: Console) -> list[Figure]:
    with scratch_ledger() as url, connect(url) as conn:
        singles = _rows(conn, EVENTS)
        started = time.perf_counter()
        for request_id in track(singles, description="one commit per event", console=console):
            record_event(conn, _event(request_id))
        single_rate = EVENTS / (time.perf_counter() - started)

        grouped = _rows(conn, EVENTS)
        started = time.perf_counter()
        for i in track(range(0, EVENTS, GROUP), description="group commit", console=console):
            record_events(conn, [_event(r) for r in grouped[i : i + GROUP]])
        group_rate = EVENTS / (time.perf_counter() - started)
        waiting = conn.execute(
            "select count(*) as n from generations where status <> 'completed'"
        ).fetchone()["n"]
        assert waiting == 0, f"{waiting} rows were not completed"
    return [
        Figure(
            f"events applied, {GROUP} per transaction",
            group_rate,
            "one transaction per event",
            single_rate,
            required=1.5,
        )
    ]
