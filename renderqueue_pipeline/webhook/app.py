"""`POST /webhooks/fal`: verify, record, apply, answer. Plus `/healthz` and `/metrics`.

Answers:
  200  stored and applied (or a duplicate: nothing changed)
  202  stored; its generation row does not exist yet, it is applied when the row appears
  400  not JSON, not fal's body shape, or the header request id differs from the body's
  401  missing/malformed signature headers, timestamp more than 300 s off, bad signature
  413  body over the size limit
  422  the event cannot be stored (e.g. a NUL escape that jsonb refuses)
  503  Postgres unreachable or no usable JWKS: fal retries later (Retry-After)
Never 2xx for an event that is not durably committed.
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
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.errors import DatabaseUnavailable, LedgerInputError
from renderqueue_pipeline.ledger import event_from_fal_webhook
from renderqueue_pipeline.webhook.committer import EventNotStorable, GroupCommitter
from renderqueue_pipeline.webhook.signature import JwksUnavailable, JwksVerifier, SignatureRejected

log = logging.getLogger("renderqueue.webhook")

DEFAULT_MAX_BODY = 1024 * 1024
RETRY_AFTER_SECONDS = "5"


class BodyTooLarge(Exception):
    pass


@dataclass
class ReceiverConfig:
    database_url: str
    jwks_url: str
    max_body: int = DEFAULT_MAX_BODY
    max_batch: int = 256
    max_wait: float = 0.002
    flushers: int = 2
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
        self.waiting = Gauge(
            "renderqueue_events_waiting_for_row",
            "Stored events whose generation row does not exist yet",
            registry=self.registry,
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _answer(
    status: int, outcome: str, metrics: Metrics, started: float, **extra: object
) -> Response:
    metrics.deliveries.labels(outcome=outcome).inc()
    metrics.latency.observe(time.perf_counter() - started)
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
    return JSONResponse({"outcome": outcome, **extra}, status_code=status, headers=headers)


def create_app(config: ReceiverConfig | None = None) -> Starlette:
    """The ASGI app; with no config, settings come from the environment."""
    if config is None:
        from renderqueue_pipeline.db.server import database_url
        from renderqueue_pipeline.settings import get_settings

        settings = get_settings()
        config = ReceiverConfig(database_url=database_url(), jwks_url=settings.fal_jwks_url)

    metrics = Metrics()
    committer = GroupCommitter(
        config.database_url,
        max_batch=config.max_batch,
        max_wait=config.max_wait,
        flushers=config.flushers,
    )
    verifier = JwksVerifier(config.jwks_url, min_refresh=config.jwks_min_refresh)

    async def receive_fal(request: Request) -> Response:
        started = time.perf_counter()
        try:
            body = await read_body(request, config.max_body)
        except BodyTooLarge:
            return _answer(413, "too_large", metrics, started, limit=config.max_body)
        try:
            signed = await verifier.verify(request.headers, body)
        except SignatureRejected as exc:
            log.warning("rejected webhook: %s", exc)
            return _answer(401, "bad_signature", metrics, started, error=str(exc))
        except JwksUnavailable as exc:
            log.error("cannot verify webhooks: %s", exc)
            return _answer(503, "jwks_unavailable", metrics, started)
        try:
            document = json.loads(body)
            event = event_from_fal_webhook(document)
        except (ValueError, LedgerInputError) as exc:
            reason = str(exc) if isinstance(exc, LedgerInputError) else "body is not JSON"
            return _answer(400, "bad_body", metrics, started, error=reason)
        if event.request_id != signed.request_id:
            return _answer(
                400,
                "request_id_mismatch",
                metrics,
                started,
                error="X-Fal-Webhook-Request-Id differs from the body's request_id",
            )
        try:
            outcome = await committer.submit(event)
        except EventNotStorable as exc:
            log.error("webhook for %s not storable: %s", event.request_id, exc)
            return _answer(422, "not_storable", metrics, started, error=str(exc))
        except DatabaseUnavailable as exc:
            log.error("database unavailable, asking fal to retry %s: %s", event.request_id, exc)
            return _answer(503, "database_unavailable", metrics, started)
        status = 202 if outcome == "waiting" else 200
        log.info(
            "webhook request_id=%s kind=%s outcome=%s ms=%.1f",
            event.request_id,
            event.kind,
            outcome,
            (time.perf_counter() - started) * 1000,
        )
        return _answer(status, outcome, metrics, started, request_id=event.request_id)

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

    app = Starlette(
        routes=[
            Route("/webhooks/fal", receive_fal, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.committer = committer
    app.state.verifier = verifier
    app.state.metrics = metrics
    return app
