"""`renderqueue demo`: the whole loop on one machine, with no fal account.

Embedded Postgres, the local fal simulator (real TLS, real fal-client), the webhook
receiver, a handful of submissions through the ledger's submit path, webhooks applied as
they arrive, then the Dagster ledger job on a Postgres-backed instance.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.db.server import database_url
from renderqueue_pipeline.ledger.report import dollars
from renderqueue_pipeline.settings import get_settings, redact_url

# (user, endpoint, inputs): a small, mixed batch priced from the seeded price table
DEMO_REQUESTS: list[tuple[int, str, dict]] = [
    (
        101,
        "bytedance/seedance-2.0/text-to-video",
        {"prompt": "a red fox trotting through fresh snow, golden hour", "duration": "5"},
    ),
    (
        101,
        "bytedance/seedance-2.0/text-to-video",
        {
            "prompt": "timelapse of clouds over a mountain lake",
            "duration": "auto",
            "resolution": "1080p",
        },
    ),
    (
        102,
        "bytedance/seedance-2.0/fast/text-to-video",
        {"prompt": "a paper boat drifting down a rainy street", "duration": "4"},
    ),
    (
        102,
        "fal-ai/veo3.1",
        {
            "prompt": "a lighthouse in a storm, waves crashing",
            "duration": "8s",
            "generate_audio": False,
        },
    ),
    (
        103,
        "fal-ai/kling-video/v3/turbo/pro/text-to-video",
        {"prompt": "macro shot of a bee landing on lavender", "duration": "5"},
    ),
    (
        103,
        "bytedance/seedance-2.0/text-to-video",
        {"prompt": "a city skyline from day to night", "duration": "6", "resolution": "480p"},
    ),
]
TERMINAL = ("completed", "failed", "canceled")


@contextmanager
def local_fal(home: Path, *, seed: int = 2, failure_rate: float = 0.15):
    """Start the fal simulator and point fal-client at it (before fal_client is imported)."""
    from renderqueue_pipeline.simulator.config import SimConfig
    from renderqueue_pipeline.simulator.server import SimulatorServer

    server = SimulatorServer(
        home, port=0, config=SimConfig(seed=seed, failure_rate=failure_rate)
    ).start()
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()


async def _submit_all(url: str, webhook_url: str) -> list[tuple[int, str, dict, str]]:
    from renderqueue_pipeline.fal_gateway import FalGateway, FalRejected, SubmitResult
    from renderqueue_pipeline.ledger import asubmit_generation

    async with FalGateway(default_webhook_url=webhook_url) as gateway:

        async def submit(endpoint: str, inputs: dict) -> SubmitResult:
            return await gateway.submit(endpoint, inputs)  # the ledger keeps fal_expires_at

        async def one(user_id: int, endpoint: str, inputs: dict) -> tuple[int, str, dict, str]:
            with connect(url) as conn:  # one connection per concurrent submission
                request_id = await asubmit_generation(
                    conn,
                    submit,
                    user_id=user_id,
                    endpoint=endpoint,
                    inputs=inputs,
                    is_definite_rejection=lambda exc: isinstance(exc, FalRejected),
                )
            return user_id, endpoint, inputs, request_id

        return await asyncio.gather(*(one(*request) for request in DEMO_REQUESTS))


def _wait_for_webhooks(url: str, request_ids: list[str], console: Console, timeout: float = 60):
    with (
        Progress(
            TextColumn("waiting for fal's webhooks"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
        connect(url, autocommit=True) as conn,
    ):
        task = progress.add_task("webhooks", total=len(request_ids))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = conn.execute(
                "select count(*) as n from generations where request_id = any(%s) "
                "and status::text = any(%s)",
                (request_ids, list(TERMINAL)),
            ).fetchone()["n"]
            progress.update(task, completed=done)
            if done == len(request_ids):
                return
            time.sleep(0.2)
    console.print("[yellow]some webhooks have not arrived yet; the reconciler will catch up[/]")


def run_demo(console: Console | None = None) -> bool:
    """Run the demo; True when the Dagster job succeeded."""
    from dagster import DagsterInstance

    from renderqueue_pipeline.dagster_home import ensure_dagster_home
    from renderqueue_pipeline.definitions import defs
    from renderqueue_pipeline.ledger.report import print_ledger_status
    from renderqueue_pipeline.webhook.app import ReceiverConfig, create_app
    from renderqueue_pipeline.webhook.background import serve_in_thread

    console = console or Console()
    home = get_settings().home_dir
    url = database_url()
    console.print(f"ledger database: {redact_url(url)}")
    applied = migrate(url)
    console.print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")

    with local_fal(home) as fal:
        console.print(f"fal simulator: {fal.base_url} (no fal account needed, nothing is billed)")
        receiver_app = create_app(ReceiverConfig(url, f"{fal.base_url}/.well-known/jwks.json"))
        with serve_in_thread(receiver_app) as receiver:
            console.print(f"webhook receiver: {receiver}/webhooks/fal")
            submitted = asyncio.run(_submit_all(url, f"{receiver}/webhooks/fal"))
            table = Table(title=f"submitted {len(submitted)} generations")
            for column in ("user", "endpoint", "request_id", "estimate"):
                table.add_column(column)
            with connect(url) as conn:
                for user_id, endpoint, _, request_id in submitted:
                    row = conn.execute(
                        "select cost_micros from generations where request_id = %s", (request_id,)
                    ).fetchone()
                    table.add_row(str(user_id), endpoint, request_id, dollars(row["cost_micros"]))
            console.print(table)
            _wait_for_webhooks(url, [r for *_, r in submitted], console)

    home_dir = ensure_dagster_home(url)
    console.print(f"dagster instance: {home_dir} (storage in Postgres)")
    with DagsterInstance.get() as instance:
        result = (
            defs()
            .resolve_job_def("ledger_status_job")
            .execute_in_process(
                instance=instance,
                run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
            )
        )
    console.print(f"dagster run {result.run_id}: {'success' if result.success else 'FAILED'}")
    print_ledger_status(url, console)
    return result.success
