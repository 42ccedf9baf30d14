"""`renderqueue webhook serve`."""

from __future__ import annotations

import logging
import sys

import click
import uvicorn
from uvicorn.supervisors import Multiprocess

from renderqueue_pipeline.db.server import database_url
from renderqueue_pipeline.settings import ConfigError, get_settings


@click.group()
def webhook() -> None:
    """The fal webhook receiver."""


@webhook.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True, type=int, help="0: any free port")
@click.option("--workers", default=1, show_default=True, type=int, help="uvicorn worker processes")
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--limit-concurrency",
    default=1024,
    show_default=True,
    type=click.IntRange(min=1),
    help="Connections and requests served at once per worker; beyond it uvicorn answers 503 "
    "(connections still sending a request head are capped at 512 first: oldest closed).",
)
@click.option(
    "--insecure-jwks",
    is_flag=True,
    help="Allow a plain http:// FAL_JWKS_URL (tests and benchmarks only).",
)
def serve(
    host: str, port: int, workers: int, log_level: str, limit_concurrency: int, insecure_jwks: bool
) -> None:
    """Serve POST /webhooks/fal, GET /healthz and GET /metrics.

    Settings come from the environment (DATABASE_URL or the embedded server, FAL_JWKS_URL,
    FAL_WEBHOOK_USER_IDS).
    """
    # the receiver's own modules (PyNaCl, uvicorn's HTTP protocols) load only for `serve`
    from renderqueue_pipeline.webhook.limits import server_options  # noqa: PLC0415
    from renderqueue_pipeline.webhook.signature import check_jwks_url  # noqa: PLC0415

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    settings = get_settings()  # a bad value is one line now, not a 500 per request
    try:
        check_jwks_url(settings.fal_jwks_url, allow_http=insecure_jwks)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # Starts the embedded server before workers fork. No migration here: the receiver runs
    # as a role that may not; `renderqueue db migrate` is its own step, and until it has
    # run the receiver answers 503 (fal retries) and /healthz says why.
    database_url()
    factory = "create_insecure_jwks_app" if insecure_jwks else "create_app"
    config = uvicorn.Config(
        f"renderqueue_pipeline.webhook.app:{factory}",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
        **server_options(limit_concurrency=limit_concurrency),
    )
    # bound here, before workers fork, so `--port 0` can say which port it got: a caller
    # reads it back instead of guessing a free port (which another process may take first)
    sock = config.bind_socket()
    # listening at once: a caller that read the port may connect before uvicorn starts
    # serving (it waits in the backlog) instead of being refused
    sock.listen(config.backlog)
    click.echo(f"# webhook receiver serving on http://{host}:{sock.getsockname()[1]}")
    sys.stdout.flush()
    if workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        config.load_app()
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
        if not server.started:
            sys.exit(3)  # uvicorn's STARTUP_FAILURE, as uvicorn.run exits
