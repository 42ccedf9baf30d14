"""`renderqueue webhook serve`."""

from __future__ import annotations

import click


@click.group()
def webhook() -> None:
    """The fal webhook receiver."""


@webhook.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="uvicorn worker processes")
@click.option("--log-level", default="info", show_default=True)
def serve(host: str, port: int, workers: int, log_level: str) -> None:
    """Serve POST /webhooks/fal, GET /healthz and GET /metrics.

    Settings come from the environment (DATABASE_URL or the embedded server, FAL_JWKS_URL).
    """
    import logging

    import uvicorn

    from renderqueue_pipeline.db.migrate import migrate
    from renderqueue_pipeline.db.server import database_url

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    migrate(database_url())  # also starts the embedded server before workers fork
    uvicorn.run(
        "renderqueue_pipeline.webhook.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
    )
