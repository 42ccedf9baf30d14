"""The gateway's second door: fal's Platform APIs (pricing, billing events, usage, the
request list).

Queue calls go through `fal_gateway.FalGateway` (fal-client); the Platform APIs are plain
REST under RENDERQUEUE_FAL_API_URL (default `fal_defaults.FAL_API_URL`) with an admin key
(FAL_ADMIN_KEY, falling back to FAL_KEY). Every call here is a read, so transport errors,
429 and 5xx are retried with backoff. The key is sent only in the Authorization header:
never logged, never part of a repr or an error message. A refused key is one clear error
naming the variable it came from.

List calls page with `cursor` until `has_more` is false; ranges longer than fal's 90-day
cap are split into windows, and more than 50 ids into chunks.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.fal_defaults import FAL_API_URL
from renderqueue_pipeline.tls import ssl_context

if TYPE_CHECKING:
    from renderqueue_pipeline.settings import Settings

log = logging.getLogger("renderqueue.fal.platform")

MAX_PAGE = 10_000
MAX_IDS = 50
#: the request list pages at most 100 entries
MAX_REQUEST_PAGE = 100
REQUEST_STATUSES = frozenset({"success", "error", "user_error"})
MAX_RANGE = dt.timedelta(days=90)
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class FalPlatformError(RenderqueueError):
    """fal's Platform API answered with an error we do not retry (or kept failing)."""


class FalPlatformAuthError(FalPlatformError):
    """The admin key was missing or refused; the message names the variable to fix."""


class _Retryable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)


@dataclass(frozen=True)
class FalPrice:
    """One row of GET /models/pricing."""

    endpoint_id: str
    unit_price: float
    unit: str
    currency: str


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def _iso(moment: dt.datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("Platform API times must be timezone-aware")
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("detail"):
            return str(body["detail"])
    return str(body)[:200]


class FalPlatform:
    """A synchronous client of fal's Platform APIs (one per thread; close it, or use `with`)."""

    def __init__(
        self,
        key: str | None,
        *,
        key_variable: str = "FAL_ADMIN_KEY",
        base_url: str = FAL_API_URL,
        timeout: float = 60.0,
        retry_attempts: int = 5,
        retry_initial: float = 0.5,
        retry_max: float = 10.0,
    ) -> None:
        if not key:
            raise FalPlatformAuthError(
                "FAL_ADMIN_KEY: not set (nor FAL_KEY); fal's Platform APIs need an admin key"
            )
        self.key_variable = key_variable
        self.base_url = base_url.rstrip("/")
        self.retry_attempts = max(1, retry_attempts)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Key {key}", "Accept": "application/json"},
            timeout=timeout,
            verify=ssl_context(),
        )
        self.requests_made = 0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> FalPlatform:
        """FAL_ADMIN_KEY (else FAL_KEY) and RENDERQUEUE_FAL_API_URL as `settings` (read by
        the caller, an entry point) holds them."""
        if settings.fal_admin_key is not None:
            key, variable = settings.fal_admin_key.get_secret_value(), "FAL_ADMIN_KEY"
        elif settings.fal_key is not None:
            key, variable = settings.fal_key.get_secret_value(), "FAL_KEY"
        else:
            key, variable = None, "FAL_ADMIN_KEY"
        overrides.setdefault("base_url", settings.fal_api_url or FAL_API_URL)
        return cls(key, key_variable=variable, **overrides)

    def __repr__(self) -> str:  # never show the key
        return f"FalPlatform(base_url={self.base_url!r}, key from {self.key_variable})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FalPlatform:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----- transport -------------------------------------------------------------------------

    def _get(self, path: str, params: list[tuple[str, str]]) -> Any:
        """GET with retries on transport errors, 408/429/5xx; other errors raise at once."""
        retrying = Retrying(
            stop=stop_after_attempt(self.retry_attempts),
            wait=wait_exponential_jitter(multiplier=self.retry_initial, max=self.retry_max),
            retry=retry_if_exception(lambda e: isinstance(e, _Retryable | httpx.TransportError)),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return self._get_once(path, params)
        except _Retryable as exc:
            raise FalPlatformError(
                f"fal Platform API GET {path}: still failing after {self.retry_attempts} "
                f"attempts: {exc}"
            ) from None
        except httpx.TransportError as exc:
            raise FalPlatformError(
                f"fal Platform API GET {path}: cannot reach {self.base_url}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        raise AssertionError("unreachable")

    def _get_once(self, path: str, params: list[tuple[str, str]]) -> Any:
        self.requests_made += 1
        # a tuple: httpx types a list of pairs invariantly (str values are its PrimitiveData)
        response = self._http.get(path, params=tuple(params))
        if response.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {response.status_code}: {_detail(response)}")
        if response.status_code in (401, 403):
            raise FalPlatformAuthError(
                f"{self.key_variable}: fal's Platform API refused the admin key "
                f"(HTTP {response.status_code}: {_detail(response)})"
            )
        if response.status_code >= 400:
            raise FalPlatformError(
                f"fal Platform API GET {path}: HTTP {response.status_code}: {_detail(response)}"
            )
        return response.json()

    # ----- calls -----------------------------------------------------------------------------

    def pricing(self, endpoint_ids: Iterable[str]) -> list[FalPrice]:
        """Unit prices of these endpoints (ids fal does not price are simply absent)."""
        ids = sorted(set(endpoint_ids))
        prices: list[FalPrice] = []
        for chunk in _chunks(ids, MAX_IDS):
            cursor: str | None = None
            while True:
                params = [("endpoint_id", ",".join(chunk))]
                if cursor:
                    params.append(("cursor", cursor))
                body = self._get("/models/pricing", params)
                prices += [
                    FalPrice(
                        str(p["endpoint_id"]),
                        float(p["unit_price"]),
                        str(p.get("unit") or ""),
                        str(p.get("currency") or "USD"),
                    )
                    for p in body.get("prices", [])
                ]
                cursor = body.get("next_cursor")
                if not body.get("has_more") or not cursor:
                    break
        return prices

    def billing_event_pages(
        self,
        start: dt.datetime,
        end: dt.datetime,
        *,
        endpoint_ids: Sequence[str] = (),
        request_ids: Sequence[str] = (),
        page_size: int = MAX_PAGE,
    ) -> Iterator[list[dict[str, Any]]]:
        """Billing events with start <= timestamp < end, one list per page, in fal's order."""
        if not 1 <= page_size <= MAX_PAGE:
            raise ValueError(f"page_size must be 1..{MAX_PAGE}")
        id_param, ids = (
            ("request_id", list(request_ids))
            if request_ids
            else ("endpoint_id", list(endpoint_ids))
        )
        id_chunks: list[list[str]] = list(_chunks(ids, MAX_IDS)) if ids else [[]]
        window_start = start
        while window_start < end:
            window_end = min(end, window_start + MAX_RANGE)
            for chunk in id_chunks:
                cursor: str | None = None
                while True:
                    params = [
                        ("start", _iso(window_start)),
                        ("end", _iso(window_end)),
                        ("limit", str(page_size)),
                    ]
                    if chunk:
                        params.append((id_param, ",".join(chunk)))
                    if cursor:
                        params.append(("cursor", cursor))
                    body = self._get("/models/billing-events", params)
                    page = body.get("billing_events", [])
                    if page:
                        yield page
                    cursor = body.get("next_cursor")
                    if not body.get("has_more") or not cursor:
                        break
            window_start = window_end

    def usage_summary(
        self, start: dt.datetime, end: dt.datetime, endpoint_ids: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """GET /models/usage?expand=summary: quantity and cost per endpoint over the range."""
        summary: list[dict[str, Any]] = []
        for chunk in list(_chunks(list(endpoint_ids), MAX_IDS)) or [[]]:
            params = [("start", _iso(start)), ("end", _iso(end)), ("expand", "summary")]
            if chunk:
                params.append(("endpoint_id", ",".join(chunk)))
            summary += self._get("/models/usage", params).get("summary", [])
        return summary

    def usage_by_tag(
        self,
        start: dt.datetime,
        end: dt.datetime,
        tag_key: str,
        endpoint_ids: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """GET /models/usage?group_by=tag&tag_key=k&expand=summary: quantity, cost and
        request count per (endpoint, value of tag k) over the range; requests without the
        tag are one group with `tag_value` null. Needs usage by tag enabled for the account
        (else fal answers an error, raised as FalPlatformError). Ranges over 90 days are
        split into windows, more than 50 endpoint ids into chunks; the shape is unverified
        (docs/simulator.md)."""
        summary: list[dict[str, Any]] = []
        window_start = start
        while window_start < end:
            window_end = min(end, window_start + MAX_RANGE)
            for chunk in list(_chunks(list(endpoint_ids), MAX_IDS)) or [[]]:
                params = [
                    ("start", _iso(window_start)),
                    ("end", _iso(window_end)),
                    ("expand", "summary"),
                    ("group_by", "tag"),
                    ("tag_key", tag_key),
                ]
                if chunk:
                    params.append(("endpoint_id", ",".join(chunk)))
                summary += self._get("/models/usage", params).get("summary", [])
            window_start = window_end
        return summary

    def requests_by_endpoint(
        self,
        endpoint_id: str,
        start: dt.datetime,
        end: dt.datetime,
        *,
        statuses: Sequence[str] = (),
        request_ids: Sequence[str] = (),
        payloads: bool = False,
        page_size: int = MAX_REQUEST_PAGE,
    ) -> Iterator[dict[str, Any]]:
        """fal's requests of one endpoint sent in [start, end), every page, in fal's order.

        `GET /models/requests/by-endpoint`: each entry names the request (`request_id`), its
        outcome (`status`: success, error, user_error; none while open) and the
        `X-Fal-Tags` it carried (`tags`). Ranges over 90 days are split into windows,
        more than 50 request ids into chunks.
        """
        if not 1 <= page_size <= MAX_REQUEST_PAGE:
            raise ValueError(f"page_size must be 1..{MAX_REQUEST_PAGE}")
        if unknown := set(statuses) - REQUEST_STATUSES:
            raise ValueError(f"statuses: expected success|error|user_error, got {sorted(unknown)}")
        id_chunks: list[list[str]] = list(_chunks(list(request_ids), MAX_IDS)) or [[]]
        window_start = start
        while window_start < end:
            window_end = min(end, window_start + MAX_RANGE)
            for chunk in id_chunks:
                cursor: str | None = None
                while True:
                    params = [
                        ("endpoint_id", endpoint_id),
                        ("start", _iso(window_start)),
                        ("end", _iso(window_end)),
                        ("limit", str(page_size)),
                    ]
                    if statuses:
                        params.append(("status", ",".join(sorted(statuses))))
                    if chunk:
                        params.append(("request_id", ",".join(chunk)))
                    if payloads:
                        params.append(("expand", "payloads"))
                    if cursor:
                        params.append(("cursor", cursor))
                    body = self._get("/models/requests/by-endpoint", params)
                    yield from body.get("items", [])
                    cursor = body.get("next_cursor")
                    if not body.get("has_more") or not cursor:
                        break
            window_start = window_end
