"""`POST /webhooks/fal`: verify, record, apply, answer. Plus `/healthz` and `/metrics`.

Answers (docs/webhook.md has the table, with what fal does with each):
  200  stored and applied (or a duplicate: nothing changed)
  202  stored; its generation row does not exist yet, it is applied when the row appears
  400  not JSON, not fal's body shape, or the header request id differs from the body's
  401  missing/malformed signature headers, timestamp more than 300 s off (unless it is a
       late retry for a request we know), a signature that fails against a key set
       fetched after the delivery arrived
  403  signed by fal for a fal user not in FAL_WEBHOOK_USER_IDS (nothing stored)
  413  body over the size limit
  422  Postgres refused the event's content (SQLSTATE class 22), or JSON nested deeper
       than MAX_JSON_DEPTH (no fal delivery is)
  431  request headers over the size cap (limits.py, before the app)
  503  anything that is our fault: database unreachable, read-only, not migrated (checked
       at start and until it is: `schema_not_current`; the receiver never migrates), missing
       privilege, lock/statement timeout, too many deliveries queued, the delivery's
       deadline passed, no usable JWKS or a key we could not refresh yet; and a body that
       arrives too slowly, or the oldest of too many bodies being read (cut off so that a
       trickle cannot lock genuine deliveries out). fal retries later (Retry-After)
Never 2xx for an event that is not durably committed. No answer body carries database
error text, host, user or database name: those are logged with the request id.

Header checks (presence, shape, time window, user id) happen before the body is read.

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
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NamedTuple

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from renderqueue_pipeline.db import LedgerConnection, one_row
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.db.server import database_url
from renderqueue_pipeline.errors import DatabaseUnavailable, LedgerInputError
from renderqueue_pipeline.ledger import event_from_fal_webhook, expired_event_count
from renderqueue_pipeline.settings import ConfigError, get_settings
from renderqueue_pipeline.webhook.committer import (
    DEFAULT_COMMIT_TIMEOUT,
    DEFAULT_MAX_PENDING,
    UNKNOWN_REQUEST,
    EventNotStorable,
    GroupCommitter,
    describe,
    open_connection,
)
from renderqueue_pipeline.webhook.payload import jsonb_safe, needs_escaping
from renderqueue_pipeline.webhook.schema import SchemaGate
from renderqueue_pipeline.webhook.signature import (
    MAX_CLOCK_SKEW_SECONDS,
    JwksUnavailable,
    JwksVerifier,
    SignatureRejected,
    SignedHeaders,
    StaleTimestamp,
)

log = logging.getLogger("renderqueue.webhook")

DEFAULT_MAX_BODY = 1024 * 1024
FAL_PATH = "/webhooks/fal"
RETRY_AFTER_SECONDS = "5"
#: fal gives an attempt 15 s; we answer (503 at worst) well before it gives up on us
DEFAULT_DELIVERY_DEADLINE = 12.0
#: a delivery whose signed timestamp is older than the window but younger than this is a
#: late retry (fal retries over about 2 hours): accepted for a request id we know
LATE_RETRY_MAX_AGE = 3 * 3600
DEFAULT_MAX_READING = 256
#: a body must arrive at this rate on average (bytes/s) after a grace period, and whole
#: within the body timeout: a trickle cannot hold a reading slot
DEFAULT_BODY_MIN_RATE = 32 * 1024
DEFAULT_BODY_GRACE = 2.0
DEFAULT_BODY_TIMEOUT = 10.0
#: how often the bodies being read are checked against their rate and deadline
RATE_CHECK_INTERVAL = 0.25
#: deeper JSON is refused (422 too_deep): fal's bodies nest a few levels; Python's parser
#: and the ledger's walks of the payload recurse
MAX_JSON_DEPTH = 64
PROBE_INTERVAL = 1.0


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    """The client disconnected before sending its whole body."""


class CutOff(Exception):
    """The body was cut off: too slow (`slow_body`) or the oldest of too many (`busy`)."""


class _Reader:
    """One body being read: when it started, how much came, and why it was cut off."""

    __slots__ = ("cut", "deadline", "received", "started")

    def __init__(self, started: float, deadline: float) -> None:
        self.started = started
        self.deadline = deadline
        self.received = 0
        self.cut: str | None = None  # "busy" or "slow_body" once cut off


def json_depth(document: object) -> int:
    """How deeply arrays and objects nest in a parsed JSON document (iterative)."""
    deepest, stack = 0, [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def too_deep(body: bytes, document: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when the document nests deeper than `limit` (counting brackets first: cheap)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    return json_depth(document) > limit


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
    #: fal user ids whose webhooks we accept; None accepts any (warned at start-up)
    user_ids: frozenset[str] | None = None
    #: plain-http JWKS URL allowed (tests only: `webhook serve --insecure-jwks`)
    insecure_jwks: bool = False
    max_pending: int = DEFAULT_MAX_PENDING  # deliveries waiting for a commit
    max_reading: int = DEFAULT_MAX_READING  # bodies read at once (beyond: oldest cut off)
    delivery_deadline: float = DEFAULT_DELIVERY_DEADLINE  # body + wait + commit, per delivery
    body_min_rate: float = DEFAULT_BODY_MIN_RATE  # bytes/s a body must average after the grace
    body_grace: float = DEFAULT_BODY_GRACE
    body_timeout: float = DEFAULT_BODY_TIMEOUT  # a whole body, however fast
    #: unix seconds now: the signed timestamp's ±300 s window and late retries are measured
    #: against it (tests pin the window's edges with a fixed clock)
    clock: Callable[[], float] = time.time


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
        self.expired = Gauge(
            "renderqueue_events_expired",
            "Stored events that waited past the retention period for a row that never came",
            registry=self.registry,
        )
        self.queued = Gauge(
            "renderqueue_webhook_queued",
            "Deliveries waiting for a group commit",
            registry=self.registry,
        )

    def observe_commit(self, events: int, seconds: float) -> None:
        self.batch_events.observe(events)
        self.commit_seconds.observe(seconds)


@dataclass
class ProbeResult:
    ok: bool
    waiting: int | None = None
    expired: int | None = None


class DatabaseProbe:
    """One reused connection, read at most once per `interval` however often it is asked."""

    def __init__(self, url: str, interval: float = PROBE_INTERVAL) -> None:
        self._url = url
        self._interval = interval
        self._conn: LedgerConnection | None = None
        self._lock = asyncio.Lock()
        self._last: ProbeResult | None = None
        self._at = float("-inf")
        self.reads = 0

    async def read(self) -> ProbeResult:
        async with self._lock:
            if self._last is None or time.monotonic() - self._at >= self._interval:
                self._last = await asyncio.to_thread(self._read)
                self._at = time.monotonic()
            return self._last

    def _read(self) -> ProbeResult:
        self.reads += 1
        try:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = open_connection(self._url, statement_timeout=2.0)
            waiting = one_row(self._conn.execute(q("webhook_probe")))["waiting"]
            return ProbeResult(True, waiting, expired_event_count(self._conn))
        except (psycopg.Error, DatabaseUnavailable) as exc:
            log.error("database probe failed: %s", describe(exc))
            self.close()
            return ProbeResult(False)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()


#: outcomes that can be answered before the body was read in full (the connection closes)
_MAYBE_UNREAD = frozenset(("bad_signature", "foreign_user", "too_large", "busy", "slow_body"))

_SIGNATURE_HEADERS = frozenset(
    (
        b"content-length",
        b"x-fal-webhook-request-id",
        b"x-fal-webhook-user-id",
        b"x-fal-webhook-timestamp",
        b"x-fal-webhook-signature",
    )
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


async def read_body(
    headers: dict[str, str], receive: Receive, limit: int, progress: _Reader | None = None
) -> bytes:
    """The raw body, refusing more than `limit` bytes without reading them all.

    `progress.received` follows the bytes read (the endpoint's minimum-rate check).
    """
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            size += len(chunk)
            if progress is not None:
                progress.received = size
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientGone


def json_answer(status: int, content: dict) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body exactly as Starlette's JSONResponse renders them."""
    body = json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")
    headers = [(b"retry-after", RETRY_AFTER_SECONDS.encode())] if status == 503 else []
    headers.append((b"content-length", str(len(body)).encode("latin-1")))
    headers.append((b"content-type", b"application/json"))
    return headers, body


class _Checked(NamedTuple):
    """Headers that passed: the signed values, and whether this is a late retry."""

    signed: SignedHeaders
    late: bool


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
        #: bodies being read now, oldest first (the task reading each)
        self._readers: dict[asyncio.Task, _Reader] = {}
        self._sweeper: asyncio.TimerHandle | None = None  # runs while bodies are being read
        self._outcomes: dict[str, Counter] = {}

    @property
    def reading(self) -> int:
        """Requests whose body is being read now."""
        return len(self._readers)

    def _cut(self, task: asyncio.Task, reader: _Reader, why: str) -> None:
        """Stop reading a body: its task gets a 503 `why` and its connection is closed."""
        reader.cut = why
        self._readers.pop(task, None)
        task.cancel()

    def _sweep(self) -> None:
        """Every RATE_CHECK_INTERVAL while bodies are being read: cut off each one that is
        behind the minimum rate or past its deadline (one timer for all, not one each)."""
        self._sweeper = None
        if not self._readers:
            return
        loop = asyncio.get_running_loop()
        now, rate, grace = loop.time(), self.config.body_min_rate, self.config.body_grace
        for task, reader in list(self._readers.items()):
            if now >= min(reader.started + grace + reader.received / rate, reader.deadline):
                self._cut(task, reader, "slow_body")
        if self._readers:
            self._sweeper = loop.call_later(RATE_CHECK_INTERVAL, self._sweep)

    async def _read(self, headers: dict[str, str], receive: Receive, deadline: float) -> bytes:
        """The body, within its deadline and minimum rate; CutOff if it was cut off.

        With `max_reading` bodies already being read, the OLDEST is cut off (503 busy), not
        the newcomer: a genuine delivery's body arrives in milliseconds, so a crowd of slow
        senders cannot keep it out.
        """
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always called from a request's task
            raise RuntimeError("the receiver's reader slot is taken outside a task")
        while len(self._readers) >= self.config.max_reading:
            oldest_task, oldest = next(iter(self._readers.items()))
            self._cut(oldest_task, oldest, "busy")
        now = loop.time()
        reader = _Reader(now, min(deadline, now + self.config.body_timeout))
        self._readers[task] = reader
        if self._sweeper is None:
            self._sweeper = loop.call_later(RATE_CHECK_INTERVAL, self._sweep)
        try:
            return await read_body(headers, receive, self.config.max_body, reader)
        except asyncio.CancelledError:
            if reader.cut is None or task.uncancel() > 0:
                raise  # not ours (the server is stopping)
            raise CutOff(reader.cut) from None
        finally:
            self._readers.pop(task, None)

    def _count(self, outcome: str, started: float) -> None:
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = self.metrics.deliveries.labels(outcome=outcome)
        counter.inc()
        self.metrics.latency.observe(time.perf_counter() - started)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        answer = await self._handle(scope, receive, started)
        if answer is None:  # the client left mid-body: nobody to answer
            self._count("client_disconnected", started)
            return
        status, content = answer
        self._count(content["outcome"], started)
        headers, body = json_answer(status, content)
        if content["outcome"] in _MAYBE_UNREAD:
            headers.append((b"connection", b"close"))  # the rest of its body is not read
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _check_headers(self, headers: dict[str, str]) -> _Checked | tuple[int, dict]:
        """The signed headers and whether this is a late retry, or a refusal."""
        verifier, late = self.verifier, False
        try:
            signed = verifier.check_headers(headers)
        except StaleTimestamp as exc:
            signed = verifier.check_headers(headers, window=False)
            age = verifier.now() - signed.timestamp
            if not MAX_CLOCK_SKEW_SECONDS < age <= LATE_RETRY_MAX_AGE:
                log.warning("rejected webhook %s: %s", headers.get("x-fal-webhook-request-id"), exc)
                return 401, {"outcome": "bad_signature", "error": str(exc)}
            late = True
        except SignatureRejected as exc:
            log.warning("rejected webhook %s: %s", headers.get("x-fal-webhook-request-id"), exc)
            return 401, {"outcome": "bad_signature", "error": str(exc)}
        allowed = self.config.user_ids
        if allowed is not None and signed.user_id not in allowed:
            log.warning(
                "refused webhook %s: fal user %r is not in FAL_WEBHOOK_USER_IDS",
                signed.request_id,
                signed.user_id,
            )
            return 403, {
                "outcome": "foreign_user",
                "error": "X-Fal-Webhook-User-Id is not an account this receiver serves",
            }
        return _Checked(signed, late)

    # the receiver's hot path in one frame, read top to bottom (docs/webhook.md: CPU per delivery)
    async def _handle(  # noqa: C901
        self, scope: Scope, receive: Receive, started: float
    ) -> tuple[int, dict] | None:
        config, verifier = self.config, self.verifier
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.delivery_deadline
        arrived = verifier.now()
        headers = request_headers(scope)
        checked = self._check_headers(headers)
        if not isinstance(checked, _Checked):
            return checked
        signed, late = checked
        try:
            body = await self._read(headers, receive, deadline)
        except BodyTooLarge:
            return 413, {"outcome": "too_large", "limit": config.max_body}
        except ClientGone:
            log.info("webhook %s: client disconnected mid-body", signed.request_id)
            return None
        except CutOff as cut:
            log.info("webhook %s: body cut off (%s); 503, fal retries", signed.request_id, cut)
            return 503, {"outcome": str(cut)}
        try:
            await verifier.verify_signed(signed, body, arrived=arrived)
        except SignatureRejected as exc:
            log.warning("rejected webhook %s: %s", signed.request_id, exc)
            return 401, {"outcome": "bad_signature", "error": str(exc)}
        except JwksUnavailable as exc:
            log.error("cannot verify webhook %s yet: %s", signed.request_id, exc)
            return 503, {"outcome": "jwks_unavailable"}
        try:
            document = json.loads(body)
            if too_deep(body, document):
                raise RecursionError
            if needs_escaping(body):
                document = jsonb_safe(document)
            event = event_from_fal_webhook(document)
        except RecursionError:
            log.warning("rejected webhook %s: JSON nested too deeply", signed.request_id)
            return 422, {
                "outcome": "too_deep",
                "error": f"JSON nested deeper than {MAX_JSON_DEPTH} levels",
            }
        except (ValueError, LedgerInputError) as exc:
            reason = str(exc) if isinstance(exc, LedgerInputError) else "body is not JSON"
            return 400, {"outcome": "bad_body", "error": reason}
        if event.request_id != signed.request_id:
            return 400, {
                "outcome": "request_id_mismatch",
                "error": "X-Fal-Webhook-Request-Id differs from the body's request_id",
            }
        try:
            outcome = await self.committer.submit(event, deadline=deadline, known_only=late)
        except EventNotStorable as exc:
            log.error("webhook %s not storable: %s", event.request_id, exc)
            return 422, {"outcome": "not_storable", "error": str(exc)}
        except DatabaseUnavailable as exc:
            log.error("webhook %s: 503, fal retries: %s", event.request_id, exc)
            return 503, {"outcome": "database_unavailable"}
        if outcome == UNKNOWN_REQUEST:
            log.warning(
                "rejected webhook %s: timestamp %s s old and no generation row for it",
                event.request_id,
                int(verifier.now() - signed.timestamp),
            )
            return 401, {
                "outcome": "bad_signature",
                "error": f"timestamp more than {MAX_CLOCK_SKEW_SECONDS} s old",
            }
        status = 202 if outcome == "waiting" else 200
        if log.isEnabledFor(logging.INFO):
            log.info(
                "webhook request_id=%s kind=%s outcome=%s%s ms=%.1f",
                event.request_id,
                event.kind,
                outcome,
                " late_retry=1" if late else "",
                (time.perf_counter() - started) * 1000,
            )
        return status, {"outcome": outcome, "request_id": event.request_id}


class _SchemaGated:
    """The fal endpoint behind the schema check: 503 (fal retries) until the database holds
    this release's migrations; the receiver never migrates (webhook/schema.py)."""

    def __init__(self, endpoint: _FalEndpoint, gate: SchemaGate) -> None:
        self.endpoint = endpoint
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.gate.ready or await self.gate.check():
            await self.endpoint(scope, receive, send)
            return
        outcome = self.gate.outcome()
        self.endpoint._count(outcome, time.perf_counter())
        headers, body = json_answer(503, {"outcome": outcome})
        headers.append((b"connection", b"close"))  # answered before its body was read
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class ReceiverApp(Starlette):
    """Starlette, with `POST /webhooks/fal` taken before the router and middleware.

    Kept because it pays: 18% less receiver CPU per delivery than a plain `Route`
    (docs/webhook.md has the A/B figures)."""

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


def config_from_settings(*, insecure_jwks: bool = False) -> ReceiverConfig:
    """The receiver's config from the environment (ConfigError on a bad value)."""

    settings = get_settings()
    return ReceiverConfig(
        database_url=database_url(),
        jwks_url=settings.fal_jwks_url,
        flushers=settings.webhook_flushers,
        user_ids=settings.webhook_user_id_set,
        insecure_jwks=insecure_jwks,
    )


def create_insecure_jwks_app() -> Starlette:
    """`webhook serve --insecure-jwks` (tests, benchmarks): a plain-http JWKS URL allowed."""
    return create_app(config_from_settings(insecure_jwks=True))


# the app's closures (health, metrics, lifespan) count here: each is short
def create_app(config: ReceiverConfig | None = None) -> Starlette:  # noqa: C901
    """The ASGI app; with no config, settings come from the environment.

    Raises ConfigError at once for an unusable FAL_JWKS_URL (empty, or not https://).
    """

    if config is None:
        config = config_from_settings()
    try:
        verifier = JwksVerifier(
            config.jwks_url,
            clock=config.clock,
            min_refresh=config.jwks_min_refresh,
            allow_http=config.insecure_jwks,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    metrics = Metrics()
    committer = GroupCommitter(
        config.database_url,
        max_batch=config.max_batch,
        max_wait=config.max_wait,
        flushers=config.flushers,
        commit_timeout=config.commit_timeout,
        max_pending=config.max_pending,
        on_commit=metrics.observe_commit,
    )
    probe = DatabaseProbe(config.database_url)
    endpoint = _FalEndpoint(config, metrics, verifier, committer)
    schema = SchemaGate(config.database_url)

    async def database_ok() -> bool:
        """The flushers' last word if it is recent and good; else the cached probe."""
        state = committer.state
        last_ok, last_error = state.last_ok, state.last_error  # written by the flush threads
        if (
            last_ok is not None
            and time.monotonic() - last_ok < PROBE_INTERVAL
            and (last_error is None or last_error < last_ok)
        ):
            return True
        return (await probe.read()).ok

    async def healthz(request: Request) -> Response:
        if not await schema.check():
            return JSONResponse(
                {"ok": False, **schema.health()},
                status_code=503,
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        if not await database_ok():
            return JSONResponse(
                {"ok": False, "database": "unavailable"},
                status_code=503,
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        return JSONResponse({"ok": True})

    async def metrics_endpoint(request: Request) -> Response:
        # on an outage keep the last known values; /healthz reports the outage
        found = await probe.read()
        if found.waiting is not None:
            metrics.waiting.set(found.waiting)
        if found.expired is not None:
            metrics.expired.set(found.expired)
        metrics.queued.set(committer.queued)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        if config.user_ids is None:
            log.warning(
                "FAL_WEBHOOK_USER_IDS is not set: accepting webhooks signed by fal for ANY "
                "fal account; set it to your fal user id(s)"
            )
        await committer.start()
        await schema.check()  # logs at start when the database is behind this release
        try:
            yield
        finally:
            await committer.stop()
            await verifier.aclose()
            await asyncio.to_thread(probe.close)
            await asyncio.to_thread(schema.close)

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
    app.state.probe = probe
    app.state.endpoint = endpoint
    app.state.schema = schema
    # what Starlette's own stack would do with an exception: a plain 500, then re-raise
    app.fal_endpoint = ServerErrorMiddleware(_SchemaGated(endpoint, schema))
    return app
