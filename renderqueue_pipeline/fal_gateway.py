"""The one door to fal: every submit, status, result and cancel goes through `FalGateway`.

Built on the real `fal_client.AsyncClient`; the same code talks to fal and to the
local simulator, only the environment differs (FAL_QUEUE_RUN_HOST, SSL_CERT_FILE,
FAL_KEY). `fal_client` is imported lazily, because it freezes FAL_QUEUE_RUN_HOST
when first imported and importing this module must not do that.

Retry policy (on top of fal-client's own: 408/409/429, nginx-style 502/503/504
and transport errors, up to 10 attempts):

- status, result and cancel are idempotent reads or idempotent writes, so we
  also retry what fal-client does not: HTTP 500/502/503/504 from fal itself and
  a transport error that survived fal-client's attempts.
- submit is NOT retried by us, ever. A submit that failed with 5xx, a timeout
  or a dropped connection may still have been enqueued (the simulator's
  `api_500_rate` does exactly that), and a blind retry could pay for the same
  video twice. Such failures raise `FalSubmitOutcomeUnknown` (carrying the
  request id when fal's response named one) so the ledger records an
  "unknown outcome" row for the reconciler instead. Note that fal-client itself
  retries a submit on a read timeout and on the edge's 5xx, with no idempotency key;
  that residual risk is why ledger rule 1 (intent row first) exists, and why every
  submit is tagged: the reconciler finds the second request in fal's request list.
  Definite rejections (4xx) raise `FalRejected` / `FalRequestError`: nothing was
  enqueued and nothing is owed.

Every submit carries `X-Fal-Object-Lifecycle-Preference` (how long fal keeps the
outputs; 7 days unless configured) and, when configured for the endpoint,
`start_timeout` (fal ends a request not started in time with a 504 marked
`X-Fal-Request-Timeout-Type: user`: `FalRequestTimedOut`, terminal, never retried).
The expiry asked for is returned as `SubmitResult.fal_expires_at` for the ledger.

Every submit made for a ledger item also carries our identity in `X-Fal-Tags`
(`rq_item=<batch item id>,rq_user=<user>[,rq_batch=<batch>]`), built here and nowhere
else (`encode_tags`): fal's request list shows the tags, so the reconciler can name every
request fal has, even one whose answer we never recorded. Values are percent-encoded
(UTF-8, RFC 3986 unreserved characters kept), so a comma, `=`, `%` or non-ASCII in a value
cannot break the header; tags over fal's limits (10 pairs, keys 64, values 256, 1 KB, no
`fal.` prefix) raise `FalTagError` before anything is sent.
A request fal puts back in its queue (runner lost) is simply `queued` again: not
terminal.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, TypeVar, runtime_checkable
from urllib.parse import quote, unquote

import httpx
from asyncstdlib import cached_property as async_cached_property
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.fal_defaults import FAL_OBJECT_LIFETIME, FAL_REST_URL
from renderqueue_pipeline.tls import ssl_context

if TYPE_CHECKING:
    from renderqueue_pipeline.settings import Settings

log = logging.getLogger("renderqueue.fal")

T = TypeVar("T")

#: Server errors fal-client does not retry itself (it retries only nginx-style 502/503/504).
RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
TIMEOUT_TYPE_HEADER = "x-fal-request-timeout-type"
LIFECYCLE_HEADER = "X-Fal-Object-Lifecycle-Preference"
TAGS_HEADER = "X-Fal-Tags"
#: fal's documented limits of X-Fal-Tags
MAX_TAGS = 10
MAX_TAG_KEY = 64
MAX_TAG_VALUE = 256
MAX_TAGS_BYTES = 1024
RESERVED_TAG_PREFIX = "fal."
_TAG_KEY = re.compile(r"[A-Za-z0-9_.:-]+")
_UNSET: Any = object()


class FalHandle(Protocol):
    """What the gateway reads from a submit's answer (fal-client's `AsyncRequestHandle`)."""

    @property
    def request_id(self) -> str: ...
    @property
    def response_url(self) -> str: ...
    @property
    def status_url(self) -> str: ...
    @property
    def cancel_url(self) -> str: ...


@runtime_checkable
class FalQueueClient(Protocol):
    """What the gateway needs from fal's client: the seam between renderqueue and fal-client.

    `pooled_fal_client` builds the one implementation (fal-client's `AsyncClient` plus two
    methods of ours); failures are fal-client's `FalClientHTTPError` (an HTTP answer) or an
    httpx error (transport), which `FalGateway` maps to its own errors.
    """

    async def submit(
        self,
        application: str,
        arguments: dict[str, Any],
        *,
        hint: str | None = None,
        webhook_url: str | None = None,
        priority: Literal["normal", "low"] | None = None,
        headers: dict[str, str] = ...,
        start_timeout: float | None = None,
    ) -> FalHandle: ...

    async def status(
        self, application: str, request_id: str, *, with_logs: bool = False
    ) -> object: ...

    async def result(self, application: str, request_id: str) -> dict[str, Any]: ...

    async def cancel(self, application: str, request_id: str) -> None: ...

    async def result_once(self, application: str, request_id: str) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


def pooled_fal_client(key: str | None, *, timeout: float, connections: int) -> FalQueueClient:
    """fal-client's AsyncClient, keeping one live connection for each request in flight.

    fal-client builds its httpx client with httpx's default pool, which keeps at most 20
    idle connections: at a fan-out of 32 or 64, every request past the 20th closes its
    connection afterwards and the next one pays a new TCP and TLS handshake.

    This is the one place that reaches into fal-client's internals (fal-client 1.0.x): its
    cached `_client` property, `AsyncBackupDomainTransport` and `USER_AGENT` (the pool),
    and `_async_maybe_retry_request` / `_raise_for_status` (`result_once`).
    `test_fal_gateway` pins what we rely on: a second burst of submits reuses the first
    burst's connections; `result_once` makes one GET, rides out the edge's 429/503 inside
    fal-client, and raises fal-client's HTTP error for a failed request.
    """
    # fal_client reads FAL_QUEUE_RUN_HOST when imported
    import fal_client as _fal_client  # noqa: PLC0415
    from fal_client.client import (  # noqa: PLC0415
        USER_AGENT,
        AsyncBackupDomainTransport,
        _async_maybe_retry_request,
        _raise_for_status,
    )

    limits = httpx.Limits(
        max_connections=None,  # the gateway's semaphore bounds what is in flight
        max_keepalive_connections=max(connections, 20),
        keepalive_expiry=30.0,
    )

    class PooledAsyncClient(_fal_client.AsyncClient):
        @async_cached_property(asyncio.Lock)
        async def _client(self) -> httpx.AsyncClient:
            auth = await self._auth
            transport = httpx.AsyncHTTPTransport(limits=limits, verify=ssl_context())
            return httpx.AsyncClient(
                transport=AsyncBackupDomainTransport(transport=transport),
                headers={"Authorization": auth.header_value, "User-Agent": USER_AGENT},
                timeout=self.default_timeout,
            )

        async def result_once(self, application: str, request_id: str) -> dict[str, Any]:
            """The result with one GET and no status polls (`result()` polls first), with
            fal-client's own retries (408/409/429, the edge's 502/503/504, transport) and
            its own error type."""
            handle = await self.get_handle(application, request_id)
            response = await _async_maybe_retry_request(
                handle.client, "GET", handle.response_url, timeout=self.default_timeout
            )
            _raise_for_status(response)
            return response.json()

        async def aclose(self) -> None:
            """Close the HTTP connection pool (only if it was ever opened)."""
            if "_client" in self.__dict__:
                http = await self._client
                await http.aclose()

    return PooledAsyncClient(key=key, default_timeout=timeout)


# ----- our small exception set -----------------------------------------------------------------


class FalError(RenderqueueError):
    """Base of every fal failure; the message names the endpoint and request id."""

    def __init__(self, message: str, *, endpoint: str, request_id: str | None = None) -> None:
        self.endpoint = endpoint
        self.request_id = request_id
        super().__init__(message)


def _where(endpoint: str, request_id: str | None, operation: str) -> str:
    if request_id:
        return f"fal {operation} {endpoint} request {request_id}"
    return f"fal {operation} {endpoint}"


class FalRequestError(FalError):
    """fal answered with an HTTP error we will not retry."""

    def __init__(
        self,
        endpoint: str,
        request_id: str | None,
        status_code: int,
        detail: Any,
        *,
        operation: str = "call",
        error_type: str | None = None,
    ) -> None:
        self.status_code = status_code
        self.detail = detail
        self.error_type = error_type
        self.operation = operation
        kind = f" ({error_type})" if error_type else ""
        super().__init__(
            f"{_where(endpoint, request_id, operation)}: HTTP {status_code}{kind}: "
            f"{_short(detail)}",
            endpoint=endpoint,
            request_id=request_id,
        )


class FalRejected(FalRequestError):
    """422: the model rejected the inputs (at submit, or as the request's result)."""


class FalRequestTimedOut(FalRequestError):
    """504 with `X-Fal-Request-Timeout-Type: user`: not started within start_timeout.

    Terminal: fal will not run it and bills nothing. Never retried.
    """


class FalCancelled(FalRequestError):
    """The request's result says it was cancelled (499); nothing was billed."""


class FalNotFound(FalRequestError):
    """404: fal does not know this request (or no longer keeps its result)."""


class FalAuthError(FalRequestError):
    """401/403: FAL_KEY missing, wrong or not allowed to use this endpoint."""


class FalUnavailable(FalError):
    """fal could not be reached or kept failing after retries; safe to try again later."""


class FalSubmitOutcomeUnknown(FalUnavailable):
    """A submit failed in a way that may still have enqueued (and billed) the request.

    Never retried automatically; `request_id` is set when fal's answer named one.
    """


class FalNotReady(FalError):
    """The result was asked for before the request completed."""

    def __init__(self, endpoint: str, request_id: str, state: str) -> None:
        self.state = state
        super().__init__(
            f"{_where(endpoint, request_id, 'result')}: not completed yet (state {state})",
            endpoint=endpoint,
            request_id=request_id,
        )


def _short(detail: Any, limit: int = 300) -> str:
    text = detail if isinstance(detail, str) else repr(detail)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FalTagError(RenderqueueError, ValueError):
    """Tags that fal would refuse or that would not fit its limits; nothing was sent."""


# ----- tags (our identity on every request) ------------------------------------------------------


@dataclass(frozen=True)
class RequestIdentity:
    """Who a request is for: the ledger item (intent), its user and its batch, if any."""

    item_id: int
    user_id: int | str
    batch_id: int | None = None

    def tags(self) -> dict[str, str]:
        tags = {"rq_item": str(self.item_id), "rq_user": str(self.user_id)}
        if self.batch_id is not None:
            tags["rq_batch"] = str(self.batch_id)
        return tags


def encode_tags(tags: Mapping[str, str]) -> str:
    """The X-Fal-Tags value `k=v,k=v`: values percent-encoded, fal's limits checked.

    Raises FalTagError (naming the tag) for a reserved or malformed key, or for tags
    beyond fal's limits: better refuse than send a request fal cannot attribute.
    """
    if len(tags) > MAX_TAGS:
        raise FalTagError(f"{TAGS_HEADER}: {len(tags)} tags; fal allows at most {MAX_TAGS}")
    pairs = []
    for key, value in tags.items():
        if not isinstance(key, str) or not _TAG_KEY.fullmatch(key):
            raise FalTagError(f"{TAGS_HEADER}: tag key {key!r} must be letters, digits or _.:-")
        if key.lower().startswith(RESERVED_TAG_PREFIX):
            raise FalTagError(f"{TAGS_HEADER}: tag key {key!r}: the 'fal.' prefix is reserved")
        if len(key) > MAX_TAG_KEY:
            raise FalTagError(f"{TAGS_HEADER}: tag key {key[:20]!r}... over {MAX_TAG_KEY} chars")
        encoded = quote(str(value), safe="")
        if len(encoded) > MAX_TAG_VALUE:
            raise FalTagError(
                f"{TAGS_HEADER}: tag {key!r} is {len(encoded)} characters once encoded; "
                f"fal allows {MAX_TAG_VALUE}"
            )
        pairs.append(f"{key}={encoded}")
    header = ",".join(pairs)
    if len(header.encode()) > MAX_TAGS_BYTES:
        raise FalTagError(
            f"{TAGS_HEADER}: {len(header.encode())} bytes; fal allows {MAX_TAGS_BYTES} in all"
        )
    return header


def decode_tags(tags: Any) -> dict[str, str]:
    """Our tags as sent, from fal's view of them (a `k=v,...` string or a mapping)."""
    if isinstance(tags, Mapping):
        items = [(str(k), str(v)) for k, v in tags.items()]
    elif isinstance(tags, str):
        items = [tuple(p.split("=", 1)) for p in tags.split(",") if "=" in p]
    elif isinstance(tags, list):
        items = []
        for entry in tags:
            if isinstance(entry, Mapping) and "key" in entry:
                items.append((str(entry["key"]), str(entry.get("value", ""))))
            elif isinstance(entry, str) and "=" in entry:
                items.append(tuple(entry.split("=", 1)))
    else:
        items = []
    return {key.strip(): unquote(value.strip()) for key, value in items}


# ----- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitResult:
    """What a submit gives back; the URLs are fal's (owner/app only, no subpath)."""

    request_id: str
    endpoint: str
    response_url: str
    status_url: str
    cancel_url: str
    webhook_url: str | None = None
    #: when fal deletes the outputs, by the lifecycle this submit asked for (None: never)
    fal_expires_at: dt.datetime | None = None
    start_timeout: float | None = None


QueueState = Literal["queued", "in_progress", "completed"]


@dataclass(frozen=True)
class Status:
    """A request's queue status. `completed` with `error` set means it did not succeed."""

    request_id: str
    endpoint: str
    state: QueueState
    queue_position: int | None = None
    logs: list[dict[str, Any]] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None

    @property
    def done(self) -> bool:
        return self.state == "completed"

    @property
    def succeeded(self) -> bool:
        return self.state == "completed" and self.error is None

    @property
    def timed_out(self) -> bool:
        """fal gave up before a runner started it (start_timeout): terminal, not billed."""
        return self.state == "completed" and self.error_type == "request_timeout"


CancelOutcome = Literal["cancellation_requested", "already_completed"]


# ----- the gateway -----------------------------------------------------------------------------


def _status_code(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None) if _is_fal_http_error(exc) else None


def _is_fal_http_error(exc: BaseException) -> bool:
    # fal_client reads FAL_QUEUE_RUN_HOST when imported
    from fal_client.client import FalClientHTTPError  # noqa: PLC0415

    return isinstance(exc, FalClientHTTPError)


def _is_user_timeout(exc: BaseException) -> bool:
    """fal's 504 for a request not started within its start_timeout."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    return _status_code(exc) == 504 and bool(headers.get(TIMEOUT_TYPE_HEADER))


def _retryable(exc: BaseException) -> bool:
    """Idempotent calls: retry fal's own 5xx and transport errors fal-client gave up on."""
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, httpx.HTTPStatusError):  # our own REST calls (delete_io)
        return exc.response.status_code in RETRYABLE_STATUS or exc.response.status_code == 429
    if _is_user_timeout(exc):
        return False  # the request's own deadline passed: asking again changes nothing
    code = _status_code(exc)
    return code in RETRYABLE_STATUS  # 429 is already retried (10x) by fal-client


class FalGateway:
    """Async access to fal's queue with bounded concurrency, retries and our own errors.

    Use one gateway per event loop (`async with FalGateway(...) as fal:`).
    """

    def __init__(
        self,
        key: str | None = None,
        *,
        max_concurrency: int = 8,
        retry_attempts: int = 4,
        retry_initial: float = 0.25,
        retry_max: float = 8.0,
        timeout: float = 120.0,
        default_webhook_url: str | None = None,
        start_timeouts: Mapping[str, float] | None = None,
        object_lifetime: float | None = FAL_OBJECT_LIFETIME,
        rest_url: str = FAL_REST_URL,
        admin_key: str | None = _UNSET,
    ) -> None:
        # fal_client reads FAL_QUEUE_RUN_HOST when imported
        import fal_client as _fal_client  # noqa: PLC0415

        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self._fal = _fal_client
        self._client: FalQueueClient = pooled_fal_client(
            key, timeout=timeout, connections=max_concurrency
        )
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self.max_concurrency = max_concurrency
        self.retry_attempts = max(1, retry_attempts)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.default_webhook_url = default_webhook_url
        self.start_timeouts = dict(start_timeouts or {})
        self.object_lifetime = object_lifetime
        self._lifecycle_header = json.dumps({"expiration_duration_seconds": object_lifetime})
        self.rest_url = rest_url.rstrip("/")
        self._admin_key = key if admin_key is _UNSET else admin_key
        self._timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> FalGateway:
        """A gateway configured as `settings` (read by the caller, an entry point) say
        (FAL_KEY, RENDERQUEUE_WEBHOOK_URL, ...)."""
        key = settings.fal_key.get_secret_value() if settings.fal_key else None
        admin = settings.fal_admin_secret
        overrides.setdefault("default_webhook_url", settings.webhook_url)
        overrides.setdefault("start_timeouts", settings.fal_start_timeouts)
        overrides.setdefault("object_lifetime", settings.fal_object_lifetime)
        overrides.setdefault("rest_url", settings.fal_rest_url)
        overrides.setdefault("admin_key", admin.get_secret_value() if admin else None)
        return cls(key, **overrides)

    def __repr__(self) -> str:  # never show the key
        return f"FalGateway(max_concurrency={self.max_concurrency}, host={self.queue_host!r})"

    @property
    def queue_host(self) -> str:
        # fal_client reads FAL_QUEUE_RUN_HOST when imported
        from fal_client.auth import FAL_QUEUE_RUN_HOST  # noqa: PLC0415

        return FAL_QUEUE_RUN_HOST

    async def __aenter__(self) -> FalGateway:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close fal-client's HTTP connection pool (only if it was ever opened)."""
        await self._client.aclose()

    # ----- plumbing ------------------------------------------------------------------------

    async def _bounded(self, call: Callable[[], Awaitable[T]]) -> T:
        async with self._semaphore:
            return await call()

    async def _idempotent(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry with exponential backoff + jitter; the semaphore is not held while waiting."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry_attempts),
            wait=wait_exponential_jitter(multiplier=self.retry_initial, max=self.retry_max),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._bounded(call)
        raise AssertionError("unreachable")  # pragma: no cover

    def _map(
        self, exc: BaseException, endpoint: str, request_id: str | None, operation: str
    ) -> FalError:
        if isinstance(exc, httpx.TransportError):
            return FalUnavailable(
                f"{_where(endpoint, request_id, operation)}: fal unreachable: "
                f"{type(exc).__name__}: {exc}",
                endpoint=endpoint,
                request_id=request_id,
            )
        code = _status_code(exc)
        if code is None:
            raise exc
        detail = getattr(exc, "message", str(exc))
        error_type = getattr(exc, "error_type", None)
        args = (endpoint, request_id, code, detail)
        kwargs = {"operation": operation, "error_type": error_type}
        if _is_user_timeout(exc):
            return FalRequestTimedOut(*args, **kwargs)
        if code == 499:
            return FalCancelled(*args, **kwargs)
        if code == 422:
            return FalRejected(*args, **kwargs)
        if code == 404:
            return FalNotFound(*args, **kwargs)
        if code in (401, 403):
            return FalAuthError(*args, **kwargs)
        if code == 429 or code >= 500:
            return FalUnavailable(
                f"{_where(endpoint, request_id, operation)}: HTTP {code} after retries: "
                f"{_short(detail)}",
                endpoint=endpoint,
                request_id=request_id,
            )
        return FalRequestError(*args, **kwargs)

    # ----- the four calls --------------------------------------------------------------------

    async def submit(
        self,
        endpoint: str,
        inputs: dict[str, Any],
        *,
        webhook_url: str | None = None,
        hint: str | None = None,
        priority: Literal["normal", "low"] | None = None,
        identity: RequestIdentity | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> SubmitResult:
        """Enqueue one request (with a webhook). Never retried by us: see the module doc.

        Sends the object lifecycle, the endpoint's start_timeout (if configured) and, with
        `identity` (the ledger item it is for), our tags; `tags` adds others. FalTagError
        is raised before the call when the tags cannot be sent.
        """
        webhook = webhook_url or self.default_webhook_url
        start_timeout = self.start_timeouts.get(endpoint)
        lifetime = self.object_lifetime
        headers = {LIFECYCLE_HEADER: self._lifecycle_header}
        all_tags = {**(identity.tags() if identity else {}), **dict(tags or {})}
        if all_tags:
            headers[TAGS_HEADER] = encode_tags(all_tags)
        asked_at = dt.datetime.now(dt.UTC)  # before the call: fal's clock starts later
        try:
            handle = await self._bounded(
                lambda: self._client.submit(
                    endpoint,
                    inputs,
                    webhook_url=webhook,
                    hint=hint,
                    priority=priority,
                    headers=headers,
                    start_timeout=start_timeout,
                )
            )
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise FalSubmitOutcomeUnknown(
                f"{_where(endpoint, None, 'submit')}: outcome unknown after "
                f"{type(exc).__name__}: {exc}; not retried (could double-submit)",
                endpoint=endpoint,
            ) from exc
        except Exception as exc:
            code = _status_code(exc)
            if code is None:
                raise
            if code >= 500:
                response = getattr(exc, "response", None)
                request_id = response.headers.get("x-fal-request-id") if response else None
                raise FalSubmitOutcomeUnknown(
                    f"{_where(endpoint, request_id or None, 'submit')}: HTTP {code}; the request "
                    "may have been enqueued; not retried (could double-submit)",
                    endpoint=endpoint,
                    request_id=request_id or None,
                ) from exc
            raise self._map(exc, endpoint, None, "submit") from exc
        log.info("fal submit %s -> %s", endpoint, handle.request_id)
        return SubmitResult(
            request_id=handle.request_id,
            endpoint=endpoint,
            response_url=handle.response_url,
            status_url=handle.status_url,
            cancel_url=handle.cancel_url,
            webhook_url=webhook,
            fal_expires_at=None if lifetime is None else asked_at + dt.timedelta(seconds=lifetime),
            start_timeout=start_timeout,
        )

    async def delete_io(self, request_id: str) -> list[DeletedFile]:
        """fal's `PUT /requests/delete_io/{request_id}` (admin key): delete the request's
        stored payloads and its output files on fal's CDN (inputs' files are kept).

        Returns one `DeletedFile` per output file; `error` is set for a file fal could not
        delete. Raises FalNotFound for an unknown request, FalAuthError without an admin key.
        """
        if not self._admin_key:
            raise FalAuthError(
                "delete_io",
                request_id,
                401,
                "no admin key: set FAL_ADMIN_KEY (or FAL_KEY)",
                operation="delete_io",
            )
        url = f"{self.rest_url}/requests/delete_io/{request_id}"
        headers = {"Authorization": f"Key {self._admin_key}"}

        async def call() -> httpx.Response:
            async with httpx.AsyncClient(timeout=self._timeout, verify=ssl_context()) as http:
                response = await http.put(url, headers=headers)
            if response.status_code in RETRYABLE_STATUS or response.status_code == 429:
                response.raise_for_status()
            return response

        try:
            response = await self._idempotent(call)
        except httpx.HTTPStatusError as exc:
            response = exc.response
        except httpx.TransportError as exc:
            raise self._map(exc, "delete_io", request_id, "delete_io") from exc
        if response.status_code >= 400:
            raise _http_error(response, request_id)
        body = response.json()
        return [
            DeletedFile(item.get("link", ""), item.get("exception"))
            for item in body.get("CDN_DELETE_RESULTS") or []
        ]

    async def status(self, endpoint: str, request_id: str, *, with_logs: bool = False) -> Status:
        """The request's queue status (fal-client builds the owner/app URL from the endpoint)."""
        try:
            raw = await self._idempotent(
                lambda: self._client.status(endpoint, request_id, with_logs=with_logs)
            )
        except Exception as exc:
            raise self._map(exc, endpoint, request_id, "status") from exc
        fal = self._fal
        if isinstance(raw, fal.Queued):
            return Status(request_id, endpoint, "queued", queue_position=raw.position)
        if isinstance(raw, fal.InProgress):
            return Status(request_id, endpoint, "in_progress", logs=raw.logs)
        if isinstance(raw, fal.Completed):
            return Status(
                request_id,
                endpoint,
                "completed",
                logs=raw.logs,
                metrics=dict(raw.metrics or {}),
                error=raw.error,
                error_type=raw.error_type,
            )
        raise FalError(  # pragma: no cover - fal-client raises on unknown statuses itself
            f"{_where(endpoint, request_id, 'status')}: unexpected status {raw!r}",
            endpoint=endpoint,
            request_id=request_id,
        )

    async def result(self, endpoint: str, request_id: str) -> dict[str, Any]:
        """The model's output of a completed request.

        Raises FalNotReady before completion, FalRejected when the model rejected
        the request (422 with fal's `detail`), FalNotFound when the result expired.
        """
        status = await self.status(endpoint, request_id)
        if not status.done:
            raise FalNotReady(endpoint, request_id, status.state)
        try:
            # fal-client polls status once more (already completed) and fetches the result
            return await self._idempotent(lambda: self._client.result(endpoint, request_id))
        except Exception as exc:
            raise self._map(exc, endpoint, request_id, "result") from exc

    async def fetch_result(self, endpoint: str, request_id: str) -> dict[str, Any]:
        """The output of a request whose status said completed: one GET, no status polls.

        `result()` polls the status twice more (ours, then fal-client's); the reconciler
        has just read the status, so it fetches with this. Raises FalRejected (the 422 body
        of a failed request), FalNotFound (expired or unknown), FalRequestError otherwise.
        """
        try:
            return await self._idempotent(lambda: self._client.result_once(endpoint, request_id))
        except Exception as exc:
            raise self._map(exc, endpoint, request_id, "result") from exc

    async def cancel(self, endpoint: str, request_id: str) -> CancelOutcome:
        """Ask fal to cancel. A running request may still finish (and be billed)."""
        try:
            await self._idempotent(lambda: self._client.cancel(endpoint, request_id))
        except Exception as exc:
            if _status_code(exc) == 400 and _body_status(exc) == "ALREADY_COMPLETED":
                return "already_completed"
            raise self._map(exc, endpoint, request_id, "cancel") from exc
        return "cancellation_requested"


@dataclass(frozen=True)
class DeletedFile:
    """One output file of a delete_io call: its CDN link and fal's error text, if any."""

    link: str
    error: str | None = None

    @property
    def deleted(self) -> bool:
        return self.error is None


def _http_error(response: httpx.Response, request_id: str) -> FalError:
    """Our error for a failed call to fal's REST API (delete_io)."""
    try:
        body = response.json()
        detail = body.get("detail", body) if isinstance(body, dict) else body
    except ValueError:
        detail = response.text
    code = response.status_code
    args = ("delete_io", request_id, code, detail)
    if code == 404:
        return FalNotFound(*args, operation="delete_io")
    if code in (401, 403):
        return FalAuthError(*args, operation="delete_io")
    if code == 429 or code >= 500:
        return FalUnavailable(
            f"fal delete_io request {request_id}: HTTP {code} after retries: {_short(detail)}",
            endpoint="delete_io",
            request_id=request_id,
        )
    return FalRequestError(*args, operation="delete_io")


def _body_status(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    try:
        body = response.json() if response is not None else None
    except ValueError:
        return None
    return body.get("status") if isinstance(body, dict) else None


# ----- what callers need from a gateway ----------------------------------------------------------


class FalSubmitter(Protocol):
    """What a batch run and a single submit need from a gateway: `FalGateway`, or a test's
    stand-in for a fault that cannot be caused for real."""

    async def submit(
        self,
        endpoint: str,
        inputs: dict[str, Any],
        *,
        webhook_url: str | None = None,
        hint: str | None = None,
        priority: Literal["normal", "low"] | None = None,
        identity: RequestIdentity | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> SubmitResult: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: Any) -> None: ...


class FalCanceller(Protocol):
    """What cancelling a batch needs from a gateway (`FalGateway`)."""

    async def cancel(self, endpoint: str, request_id: str) -> CancelOutcome: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: Any) -> None: ...
