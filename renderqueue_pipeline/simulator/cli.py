"""`renderqueue simulator ...` commands.

Every fault and timing knob of `SimConfig` is a flag of `serve` (generated from
the model, so the CLI, the control API and the test harness share one list).
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Callable
from typing import Any

import click

from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.settings import get_settings
from renderqueue_pipeline.simulator import platform
from renderqueue_pipeline.simulator.config import SimConfig
from renderqueue_pipeline.simulator.platform import platform_env
from renderqueue_pipeline.simulator.server import (
    DEFAULT_PORT,
    SimulatorServer,
    client_env,
    export_lines,
)

_HELP = {
    "queue_delay": "Seconds queued before a runner picks the request up ('A', 'A:B', 'exp:MEAN').",
    "run_time": "Seconds of inference ('A', 'A:B', 'exp:MEAN').",
    "submit_latency": "Seconds the submit call takes after enqueueing.",
    "status_latency": "Seconds each status call (GET .../status) takes.",
    "failure_rate": "Share of requests that end in ERROR with a 422 payload.",
    "payload_error_rate": "Share of OK webhooks whose payload is null with payload_error set.",
    "validation": "Where bad inputs are refused: each endpoint's own rule, or force 'submit' "
    "(HTTP 422) or 'run' (ERROR webhook with the 422 body) for all.",
    "output_extras": "Add duration/width/height to video outputs (fal does not send them).",
    "cancel_stop_rate": "Share of running requests that stop when cancelled (fal: the app "
    "decides; most finish and are billed).",
    "requeue_rate": "Chance, per runner attempt, that a running request goes back to the queue "
    "with a new gateway_request_id.",
    "requeue_limit": "At most this many re-queues per request.",
    "concurrency_limit": "fal's account cap: at most this many requests run at once; the rest "
    "wait in the queue, normal priority before low, FIFO inside each ('none': no cap).",
    "webhook_duplicate_rate": "Share of webhooks delivered twice.",
    "webhook_duplicate_delay": "Seconds between a webhook and its duplicate.",
    "webhook_drop_rate": "Share of webhooks never sent.",
    "webhook_out_of_order_rate": "Share of webhooks held back so later ones overtake them.",
    "webhook_out_of_order_delay": "Seconds a held-back webhook waits.",
    "webhook_early_rate": "Share of requests finished and delivered before submit returns.",
    "webhook_delay": "Extra seconds before every webhook delivery.",
    "webhook_max_attempts": "Delivery attempts per webhook (fal: 1 + 10 retries).",
    "webhook_retry_base": "First retry delay in seconds; doubles each attempt.",
    "webhook_retry_max": "Cap on the retry delay in seconds.",
    "webhook_retry_on": "Answers that are retried: '5xx' (and timeouts, connection errors) or "
    "'4xx+5xx'.",
    "webhook_keep_timestamp": "Retries keep the first attempt's timestamp and signature.",
    "webhook_timeout": "Seconds per delivery attempt (fal: 15, unverified).",
    "webhook_clock_skew": "Seconds added to the signed webhook timestamp.",
    "webhook_user_id": "X-Fal-Webhook-User-Id of every delivery.",
    "api_429_rate": "Share of API calls answered 429 (fal-client retries these).",
    "api_503_rate": "Share of API calls answered by the edge's nginx 503 (fal-client retries).",
    "api_500_rate": "Share of API calls answered by fal's JSON 500 with x-fal-request-id (not "
    "retried by fal-client; on submit the request is enqueued anyway).",
    "api_502_rate": "Share of API calls answered by the edge's nginx 502 (fal-client retries).",
    "api_504_rate": "Share of API calls answered by the edge's nginx 504 (fal-client retries).",
    "api_unreachable": "Every queue API call loses its connection before an answer (fal "
    "unreachable; fal-client retries transport errors).",
    "cancel_fault": "Every cancel (PUT .../cancel) fails this way: 'unreachable' (connection "
    "lost before an answer), '500' (fal's JSON 500) or '503' (the edge's nginx 503).",
    "cdn_mode": "'public': stable URLs that expire with the request's lifecycle (fal); "
    "'signed': signed URLs re-signed on every result fetch (not fal).",
    "cdn_default_lifetime": "Seconds an output file lives when the request sent no "
    "X-Fal-Object-Lifecycle-Preference ('none': forever).",
    "cdn_url_ttl": "Seconds a signed output URL stays valid in 'signed' mode (403 afterwards).",
    "result_ttl": "Seconds a result stays fetchable after completion with X-Fal-Store-IO: 0.",
    "payload_ttl": "Seconds a result stays fetchable when payloads are stored (the default).",
    "size_scale": "Multiplier on output file sizes.",
    "fal_key": "The account's plain key (default: the one generated at first start under "
    "$RENDERQUEUE_HOME/simulator/api_keys.json); any other key is refused (401).",
    "admin_key": "The account's admin key for delete_io and the Platform API (default: the "
    "generated one); the plain key is refused there (403), any other key 401.",
    "seed": "Seed of every random decision.",
}


def _knob_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add one `--kebab-name` option per SimConfig field (defaults: the model's)."""
    hints = typing.get_type_hints(SimConfig)
    for name, field in reversed(list(SimConfig.model_fields.items())):
        hint = hints[name]
        option_type: Any
        if typing.get_origin(hint) is typing.Literal:
            option_type = click.Choice(list(typing.get_args(hint)))
        elif hint is bool:
            option_type = click.BOOL
        elif hint is float:
            option_type = float
        elif hint is int:
            option_type = int
        else:
            option_type = str
        func = click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=option_type,
            default=field.default,
            show_default=field.default is not None,
            help=_HELP.get(name, ""),
        )(func)
    return func


@click.group()
def simulator() -> None:
    """Run the local fal simulator (fal's queue API, CDN and signed webhooks over HTTPS)."""


def _platform_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The Platform API simulator's port and billing knobs (more via /_sim/billing/config)."""
    options = [
        click.option(
            "--platform-port",
            type=int,
            default=None,
            help="Port of the Platform API server (default: --port + 1; 0 picks one).",
        ),
        click.option(
            "--billing-delay",
            type=float,
            default=0.0,
            show_default=True,
            help="Seconds after completion before a billing event appears.",
        ),
        click.option(
            "--billing-units-mismatch-rate",
            type=float,
            default=0.0,
            show_default=True,
            help="Share of requests billed with one more second than produced.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@simulator.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="0 picks one.")
@click.option(
    "--print-env",
    is_flag=True,
    help="Print the client's export lines and exit without serving (for eval).",
)
@click.option("--log-level", default="warning", show_default=True)
@_platform_options
@_knob_options
def serve(
    host: str,
    port: int,
    print_env: bool,
    log_level: str,
    platform_port: int | None,
    billing_delay: float,
    billing_units_mismatch_rate: float,
    **knobs: Any,
) -> None:
    """Serve the simulator; prints the `export` lines a fal client needs, then serves."""

    home = get_settings().home_dir
    try:
        config = SimConfig.model_validate({k: v for k, v in knobs.items() if v is not None})
        billing = platform.BillingConfig(
            seed=config.seed,
            admin_key=config.admin_key,  # one admin key for delete_io and the Platform API
            billing_delay=billing_delay,
            units_mismatch_rate=billing_units_mismatch_rate,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    derived_platform_port = platform_port is None
    if platform_port is None:
        platform_port = port + 1 if port else 0
    if print_env:
        if port == 0 or platform_port == 0:
            raise click.BadParameter("--print-env needs a fixed --port", param_hint="--port")
        env = {
            **client_env(home, host, port, config.fal_key, config.admin_key),
            **platform.platform_env(host, platform_port),
        }
        click.echo(export_lines(env), nl=False)
        return
    try:
        server = SimulatorServer(home, host=host, port=port, config=config, log_level=log_level)
    except OSError as exc:
        raise RenderqueueError(f"fal simulator cannot listen on {host}:{port}: {exc}") from None
    book = platform.BillingBook(billing)
    try:
        api = platform.PlatformServer(
            home, book, host=host, port=platform_port, log_level=log_level
        )
    except OSError as exc:
        if not derived_platform_port:
            raise RenderqueueError(
                f"fal Platform API simulator cannot listen on {host}:{platform_port}: {exc}"
            ) from None
        api = platform.PlatformServer(home, book, host=host, port=0, log_level=log_level)
    platform.attach(server.app.state.engine, book)
    env = {**server.env(), **platform.platform_env(host, api.port)}
    sys.stdout.write(export_lines(env))
    sys.stdout.write(f"# fal simulator serving on {server.base_url} (seed {config.seed})\n")
    sys.stdout.write(f"# fal Platform API serving on {api.api_url}\n")
    sys.stdout.flush()
    api.start()
    try:
        server.run()
    finally:
        api.stop()


@simulator.command("env")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int)
@click.option("--fal-key", default=None, help="The key the simulator was started with.")
@click.option("--admin-key", default=None, help="The admin key the simulator was started with.")
def env(host: str, port: int, fal_key: str | None, admin_key: str | None) -> None:
    """Print the export lines for a simulator on HOST:PORT (same as serve --print-env)."""

    env = {
        **client_env(get_settings().home_dir, host, port, fal_key, admin_key),
        **platform_env(host, port + 1),
    }
    click.echo(export_lines(env), nl=False)
