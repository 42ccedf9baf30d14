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
  retries a submit on a read timeout; that residual risk is why ledger rule 1
  (intent row first) exists. Definite rejections (4xx) raise `FalRejected` /
  `FalRequestError`: nothing was enqueued and nothing is owed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from renderqueue_pipeline.errors import RenderqueueError

if TYPE_CHECKING:
    import fal_client

log = logging.getLogger("renderqueue.fal")

T = TypeVar("T")

#: Server errors fal-client does not retry itself (it retries only nginx-style 502/503/504).
RETRYABLE_STATUS = frozenset({500, 502, 503, 504})


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


CancelOutcome = Literal["cancellation_requested", "already_completed"]


# ----- the gateway -----------------------------------------------------------------------------


def _status_code(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None) if _is_fal_http_error(exc) else None


def _is_fal_http_error(exc: BaseException) -> bool:
    from fal_client.client import FalClientHTTPError

    return isinstance(exc, FalClientHTTPError)


def _retryable(exc: BaseException) -> bool:
    """Idempotent calls: retry fal's own 5xx and transport errors fal-client gave up on."""
    if isinstance(exc, httpx.TransportError):
        return True
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
    ) -> None:
        import fal_client as _fal_client  # lazily: it freezes FAL_QUEUE_RUN_HOST on import

        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self._fal = _fal_client
        self._client: fal_client.AsyncClient = _fal_client.AsyncClient(
            key=key, default_timeout=timeout
        )
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self.max_concurrency = max_concurrency
        self.retry_attempts = max(1, retry_attempts)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.default_webhook_url = default_webhook_url

    @classmethod
    def from_settings(cls, settings: Any = None, **overrides: Any) -> FalGateway:
        """A gateway configured from renderqueue's settings (FAL_KEY, RENDERQUEUE_WEBHOOK_URL)."""
        from renderqueue_pipeline.settings import get_settings

        settings = settings or get_settings()
        key = settings.fal_key.get_secret_value() if settings.fal_key else None
        overrides.setdefault("default_webhook_url", settings.webhook_url)
        return cls(key, **overrides)

    def __repr__(self) -> str:  # never show the key
        return f"FalGateway(max_concurrency={self.max_concurrency}, host={self.queue_host!r})"

    @property
    def queue_host(self) -> str:
        from fal_client.auth import FAL_QUEUE_RUN_HOST

        return FAL_QUEUE_RUN_HOST

    async def __aenter__(self) -> FalGateway:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close fal-client's HTTP connection pool (only if it was ever opened)."""
        if "_client" in self._client.__dict__:
            http = await self._client._client
            await http.aclose()

    # ----- plumbing ------------------------------------------------------------------------

    async def _bounded(self, call: Callable[[], Awaitable[T]]) -> T:
        async with self._semaphore:
            return await call()

    async def _idempotent(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry with exponential backoff + jitter; the semaphore is not held while waiting."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry_attempts),
            wait=wait_exponential_jitter(initial=self.retry_initial, max=self.retry_max),
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
    ) -> SubmitResult:
        """Enqueue one request (with a webhook). Never retried by us: see the module doc."""
        webhook = webhook_url or self.default_webhook_url
        try:
            handle = await self._bounded(
                lambda: self._client.submit(endpoint, inputs, webhook_url=webhook, hint=hint)
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
        )

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
        from fal_client.client import _async_maybe_retry_request, _raise_for_status

        async def get() -> Any:
            handle = await self._client.get_handle(endpoint, request_id)
            response = await _async_maybe_retry_request(
                handle.client, "GET", handle.response_url, timeout=self._client.default_timeout
            )
            _raise_for_status(response)  # fal-client's own error type, as result() raises
            return response.json()

        try:
            return await self._idempotent(get)
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


def _body_status(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    try:
        body = response.json() if response is not None else None
    except ValueError:
        return None
    return body.get("status") if isinstance(body, dict) else None
