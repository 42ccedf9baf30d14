"""`POST /webhooks/fal`: verify, record, apply, answer. Plus `/healthz` and `/metrics`.

Answers:
  200  stored and applied (or a duplicate: nothing changed)
  202  stored; its generation row does not exist yet, it is applied when the row appears
  400  not JSON, not fal's body shape, or the header request id differs from the body's
  401  missing/malformed signature headers, timestamp more than 300 s off, bad signature
  413  body over the size limit
  422  the event cannot be stored (e.g. a NUL escape that jsonb refuses)
  503  Postgres unreachable, the batch took over 10 s (cancelled), or no usable JWKS:
       fal retries later (Retry-After)
Never 2xx for an event that is not durably committed.

`POST /webhooks/fal` is a plain ASGI endpoint that the app calls before Starlette's
router and middleware (which still serve everything else, including that path's 405s):
the answers are the bytes a Starlette JSONResponse would send, for less work per delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.errors import DatabaseUnavailable, LedgerInputError
from renderqueue_pipeline.ledger import event_from_fal_webhook
from renderqueue_pipeline.webhook.committer import (
    DEFAULT_COMMIT_TIMEOUT,
    EventNotStorable,
    GroupCommitter,
)
from renderqueue_pipeline.webhook.signature import JwksUnavailable, JwksVerifier, SignatureRejected

log = logging.getLogger("renderqueue.webhook")

DEFAULT_MAX_BODY = 1024 * 1024
FAL_PATH = "/webhooks/fal"
RETRY_AFTER_SECONDS = "5"


class BodyTooLarge(Exception):
    pass


@dataclass
class ReceiverConfig:
    database_url: str
    jwks_url: str
    max_body: int = DEFAULT_MAX_BODY
    max_batch: int = 256
    # measured with bench/webhook.py: 0.5 ms gathers ~27 deliveries per batch under load;
    # 2 ms only adds latency
    max_wait: float = 0.0005
    flushers: int = 1  # see committer.py: one keeps batches large
    commit_timeout: float = DEFAULT_COMMIT_TIMEOUT  # under fal's 15 s per attempt
    jwks_min_refresh: float = 60.0


class Metrics:
    """Prometheus metrics of one receiver process (its own registry: no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "renderqueue_webhook_deliveries",
            "Webhook deliveries by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "renderqueue_webhook_latency_seconds",
            "Time from request start to answer",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.batch_events = Histogram(
            "renderqueue_webhook_batch_events",
            "Events per group commit",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "renderqueue_webhook_commit_seconds",
            "Time to store and apply one group commit (one statement, one transaction)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=self.registry,
        )
        self.waiting = Gauge(
            "renderqueue_events_waiting_for_row",
            "Stored events whose generation row does not exist yet",
            registry=self.registry,
        )

    def observe_commit(self, events: int, seconds: float) -> None:
        self.batch_events.observe(events)
        self.commit_seconds.observe(seconds)


_SIGNATURE_HEADERS = frozenset(
    (b"content-length", b"x-fal-webhook-request-id", b"x-fal-webhook-user-id")
    + (b"x-fal-webhook-timestamp", b"x-fal-webhook-signature")
)


def request_headers(scope: Scope) -> dict[str, str]:
    """The headers the endpoint reads, first occurrence winning (as Starlette's Headers)."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in _SIGNATURE_HEADERS:
            key = name.decode("latin-1")
            if key not in found:
                found[key] = value.decode("latin-1")
    return found


async def read_body(headers: dict[str, str], receive: Receive, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes without reading them all."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


def json_answer(status: int, content: dict) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body exactly as Starlette's JSONResponse renders them."""
    body = json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")
    headers = [(b"retry-after", RETRY_AFTER_SECONDS.encode())] if status == 503 else []
    headers.append((b"content-length", str(len(body)).encode("latin-1")))
    headers.append((b"content-type", b"application/json"))
    return headers, body


class _FalEndpoint:
    """`POST /webhooks/fal` as an ASGI app (an object, so Starlette's Route does not wrap it)."""

    def __init__(
        self,
        config: ReceiverConfig,
        metrics: Metrics,
        verifier: JwksVerifier,
        committer: GroupCommitter,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.verifier = verifier
        self.committer = committer
        self._outcomes: dict[str, Counter] = {}

    def _count(self, outcome: str, started: float) -> None:
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = self.metrics.deliveries.labels(outcome=outcome)
        counter.inc()
        self.metrics.latency.observe(time.perf_counter() - started)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status, content = await self._handle(scope, receive, started)
        self._count(content["outcome"], started)
        headers, body = json_answer(status, content)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _handle(self, scope: Scope, receive: Receive, started: float) -> tuple[int, dict]:
        config, verifier = self.config, self.verifier
        headers = request_headers(scope)
        try:
            body = await read_body(headers, receive, config.max_body)
        except BodyTooLarge:
            return 413, {"outcome": "too_large", "limit": config.max_body}
        try:
            signed = await verifier.verify(headers, body)
        except SignatureRejected as exc:
            log.warning("rejected webhook: %s", exc)
            return 401, {"outcome": "bad_signature", "error": str(exc)}
        except JwksUnavailable as exc:
            log.error("cannot verify webhooks: %s", exc)
            return 503, {"outcome": "jwks_unavailable"}
        try:
            document = json.loads(body)
            event = event_from_fal_webhook(document)
        except (ValueError, LedgerInputError) as exc:
            reason = str(exc) if isinstance(exc, LedgerInputError) else "body is not JSON"
            return 400, {"outcome": "bad_body", "error": reason}
        if event.request_id != signed.request_id:
            return 400, {
                "outcome": "request_id_mismatch",
                "error": "X-Fal-Webhook-Request-Id differs from the body's request_id",
            }
        try:
            outcome = await self.committer.submit(event)
        except EventNotStorable as exc:
            log.error("webhook for %s not storable: %s", event.request_id, exc)
            return 422, {"outcome": "not_storable", "error": str(exc)}
        except DatabaseUnavailable as exc:
            log.error("database unavailable, asking fal to retry %s: %s", event.request_id, exc)
            return 503, {"outcome": "database_unavailable"}
        status = 202 if outcome == "waiting" else 200
        if log.isEnabledFor(logging.INFO):
            log.info(
                "webhook request_id=%s kind=%s outcome=%s ms=%.1f",
                event.request_id,
                event.kind,
                outcome,
                (time.perf_counter() - started) * 1000,
            )
        return status, {"outcome": outcome, "request_id": event.request_id}


class ReceiverApp(Starlette):
    """Starlette, with `POST /webhooks/fal` taken before the router and middleware."""

    fal_endpoint: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == FAL_PATH
            and scope["method"] == "POST"
            and not scope.get("root_path")
        ):
            scope["app"] = self
            await self.fal_endpoint(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(config: ReceiverConfig | None = None) -> Starlette:
    """The ASGI app; with no config, settings come from the environment."""
    if config is None:
        from renderqueue_pipeline.db.server import database_url
        from renderqueue_pipeline.settings import get_settings

        settings = get_settings()
        config = ReceiverConfig(
            database_url=database_url(),
            jwks_url=settings.fal_jwks_url,
            flushers=settings.webhook_flushers,
        )

    metrics = Metrics()
    committer = GroupCommitter(
        config.database_url,
        max_batch=config.max_batch,
        max_wait=config.max_wait,
        flushers=config.flushers,
        commit_timeout=config.commit_timeout,
        on_commit=metrics.observe_commit,
    )
    verifier = JwksVerifier(config.jwks_url, min_refresh=config.jwks_min_refresh)

    endpoint = _FalEndpoint(config, metrics, verifier, committer)

    def _count_waiting() -> int:
        with connect(config.database_url) as conn:
            return conn.execute(q("waiting_event_count")).fetchone()["waiting"]

    async def healthz(request: Request) -> Response:
        try:
            await asyncio.to_thread(_count_waiting)
        except DatabaseUnavailable as exc:
            return JSONResponse(
                {"ok": False, "database": str(exc)},
                status_code=503,
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        return JSONResponse({"ok": True})

    async def metrics_endpoint(request: Request) -> Response:
        # on an outage keep the last known value; /healthz reports the outage
        with contextlib.suppress(DatabaseUnavailable):
            metrics.waiting.set(await asyncio.to_thread(_count_waiting))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await committer.start()
        try:
            yield
        finally:
            await committer.stop()
            await verifier.aclose()

    app = ReceiverApp(
        routes=[
            Route(FAL_PATH, endpoint, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.committer = committer
    app.state.verifier = verifier
    app.state.metrics = metrics
    # what Starlette's own stack would do with an exception: a plain 500, then re-raise
    app.fal_endpoint = ServerErrorMiddleware(endpoint)
    return app
