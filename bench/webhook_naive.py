"""The naive baseline receiver of bench/webhook.py: what the seed article's handler does.

Starlette, no signature check, one autocommit statement per delivery (a single-row upsert
of the `generations` row), answered once that statement returns. Run with uvicorn:

    NAIVE_DATABASE_URL=... NAIVE_POOL_SIZE=16 \\
        uvicorn --factory bench.webhook_naive:create_app --port 8799

It gets a fair set-up: async psycopg with a pool of open connections (so a delivery never
waits for a connect), uvloop and httptools like the real receiver, no logging.
"""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

# The same statement the pgbench floor runs (bench/webhook.py, PGBENCH_SCRIPT).
UPSERT = """
insert into generations (request_id, user_id, endpoint, inputs, status, outputs, finished_at)
values (%s, 0, 'unknown', '{}', %s, %s, now())
on conflict (request_id) do update
set status = excluded.status, outputs = excluded.outputs, finished_at = excluded.finished_at
"""


def create_app() -> Starlette:
    size = int(os.environ.get("NAIVE_POOL_SIZE", "16"))
    pool = AsyncConnectionPool(
        os.environ["NAIVE_DATABASE_URL"],
        min_size=size,
        max_size=size,
        kwargs={"autocommit": True},
        open=False,
    )

    async def receive(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        status = "completed" if body.get("status") == "OK" else "failed"
        async with pool.connection() as conn:
            await conn.execute(UPSERT, (body["request_id"], status, Jsonb(body.get("payload"))))
        return JSONResponse({"ok": True})

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await pool.open(wait=True)
        try:
            yield
        finally:
            await pool.close()

    return Starlette(routes=[Route("/webhooks/fal", receive, methods=["POST"])], lifespan=lifespan)
