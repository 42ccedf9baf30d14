"""Posting a Slack-compatible JSON body to RENDERQUEUE_ALERT_WEBHOOK_URL.

The URL is a secret (Slack's incoming webhooks carry their token in the path): errors
name the host only, and any text that may quote the URL is redacted before it is logged
or stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

TIMEOUT_S = 10.0


class DeliveryError(Exception):
    """A post that did not reach a 2xx answer; the message never holds the URL."""

    def __init__(self, message: str, attempts: int = 1) -> None:
        super().__init__(message)
        self.attempts = attempts


def url_label(url: str) -> str:
    """Scheme, host and port only: what may be shown of the webhook URL."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…"


def redact(text: str, url: str) -> str:
    """`text` without the URL, its path, query or password (longest first)."""
    parts = urlsplit(url)
    secrets = [url, url.rstrip("/"), parts.path, parts.query, parts.password or ""]
    for secret in sorted({s for s in secrets if s and s != "/"}, key=len, reverse=True):
        text = text.replace(secret, "…")
    return text


def post_once(url: str, body: dict[str, Any], client: httpx.Client | None = None) -> None:
    """One POST; DeliveryError unless the receiver answers 2xx."""
    try:
        if client is None:
            response = httpx.post(url, json=body, timeout=TIMEOUT_S)
        else:
            response = client.post(url, json=body, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        detail = redact(str(exc), url) or type(exc).__name__
        raise DeliveryError(f"{type(exc).__name__} posting to {url_label(url)}: {detail}") from None
    if not 200 <= response.status_code < 300:
        raise DeliveryError(f"{url_label(url)} answered HTTP {response.status_code}")


def post_with_retries(
    url: str,
    body: dict[str, Any],
    *,
    attempts: int = 3,
    wait_s: float = 1.0,
    on_attempt: Callable[[], None] | None = None,
) -> int:
    """Post with exponential backoff (tenacity); the number of attempts made.

    Raises DeliveryError (the last error) when every attempt failed; its `attempts` says
    how many were made.
    """
    count = 0

    def attempt() -> None:
        nonlocal count
        count += 1
        if on_attempt is not None:
            on_attempt()
        post_once(url, body)

    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=wait_s, max=max(wait_s * 8, 0.0)),
        retry=retry_if_exception_type(DeliveryError),
        reraise=False,
    )
    try:
        retrying(attempt)
    except RetryError as exc:
        last = exc.last_attempt.exception()
        raise DeliveryError(str(last), attempts=count) from None
    return count
