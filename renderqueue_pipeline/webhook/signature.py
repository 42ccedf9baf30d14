"""fal webhook signatures: Ed25519 over request id, user id, timestamp and the body's hash.

Signed message (UTF-8): request_id + "\\n" + user_id + "\\n" + timestamp + "\\n" +
sha256_hex(raw body), verified against every key of fal's JWKS. The timestamp is the
header text exactly as sent, and it must be plain ASCII digits: `+1700000000` or
` 1700000000` are refused, never normalised into something that verifies.

The JWKS is cached for at most 24 h. Fetches (successful or not) happen at most once per
`min_refresh` (60 s): a failure is remembered, and until the next attempt is due a
delivery that needs a fetch is answered 503 at once, so neither a stream of forged
requests nor a down JWKS endpoint makes us hammer fal or queue behind 5 s timeouts.

A signature that matches no cached key is a 401 only when the key set it was checked
against was fetched after the delivery arrived. Otherwise (the forced refresh was not
due yet, or it failed) the key may simply be one fal rotated in since our fetch: 503,
fal retries, and the next refresh will have it.

The Ed25519 checks use libsodium through PyNaCl: about 42 µs a check on this project's
machines, against 87 µs for OpenSSL through cryptography. At that cost they run inline on
the event loop; handing them to a worker thread cost more in wake-ups than it saved
(measured with bench/webhook.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from renderqueue_pipeline.tls import ssl_context

log = logging.getLogger("renderqueue.webhook")

MAX_CLOCK_SKEW_SECONDS = 300
JWKS_MAX_AGE_SECONDS = 24 * 3600
JWKS_MIN_REFRESH_SECONDS = 60

HEADER_REQUEST_ID = "x-fal-webhook-request-id"
HEADER_USER_ID = "x-fal-webhook-user-id"
HEADER_TIMESTAMP = "x-fal-webhook-timestamp"
HEADER_SIGNATURE = "x-fal-webhook-signature"

_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9a-fA-F]{128}")


class SignatureRejected(Exception):
    """The delivery is not provably from fal (answer 401); the message says why."""


class StaleTimestamp(SignatureRejected):
    """The signed timestamp is outside the ±300 s window."""


class JwksUnavailable(Exception):
    """No key set good enough to decide: fetching failed or is not due yet (answer 503)."""


class InsecureJwksUrl(ValueError):
    """FAL_JWKS_URL is not https:// (plain http only with --insecure-jwks, for tests)."""


@dataclass(frozen=True)
class SignedHeaders:
    request_id: str
    user_id: str
    timestamp: int
    signature: bytes
    timestamp_text: str = ""  # the header as sent: what fal signed


def check_jwks_url(url: str | None, *, allow_http: bool = False) -> str:
    """The JWKS URL if usable: https:// (http:// only when `allow_http`), never empty."""
    if not url:
        raise InsecureJwksUrl("FAL_JWKS_URL is empty: unset it for fal's, or give an https:// URL")
    parsed = urlparse(url)
    allowed = ("https", "http") if allow_http else ("https",)
    if parsed.scheme not in allowed or not parsed.netloc:
        raise InsecureJwksUrl(
            f"FAL_JWKS_URL must be an https:// URL (got scheme {parsed.scheme or 'none'!r}); "
            "plain http is only for tests, with --insecure-jwks"
        )
    return url


def parse_headers(headers: Mapping[str, str], now: float, *, window: bool = True) -> SignedHeaders:
    """The four signature headers, checked for presence, shape and (with `window`) ±300 s."""
    missing = [
        name
        for name in (HEADER_REQUEST_ID, HEADER_USER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE)
        if not headers.get(name)
    ]
    if missing:
        raise SignatureRejected(f"missing header(s): {', '.join(missing)}")
    text = headers[HEADER_TIMESTAMP]
    if not _TIMESTAMP.fullmatch(text):
        raise SignatureRejected("malformed X-Fal-Webhook-Timestamp: expected unix seconds")
    timestamp = int(text)
    if not _SIGNATURE.fullmatch(headers[HEADER_SIGNATURE]):
        raise SignatureRejected("malformed X-Fal-Webhook-Signature: expected 64 bytes as hex")
    signature = bytes.fromhex(headers[HEADER_SIGNATURE])
    if window and abs(now - timestamp) > MAX_CLOCK_SKEW_SECONDS:
        raise StaleTimestamp(
            f"timestamp {timestamp} is {int(now - timestamp)} s from now "
            f"(limit ±{MAX_CLOCK_SKEW_SECONDS} s)"
        )
    return SignedHeaders(
        headers[HEADER_REQUEST_ID], headers[HEADER_USER_ID], timestamp, signature, text
    )


def signed_message(request_id: str, user_id: str, timestamp: int | str, body: bytes) -> bytes:
    """The exact bytes fal signs (`timestamp` as the header text)."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{request_id}\n{user_id}\n{timestamp}\n{digest}".encode()


def keys_from_jwks(document: object) -> list[VerifyKey]:
    """Ed25519 keys of a JWKS document; other key types, and malformed keys, are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document: expected {'keys': [...]}")
    keys = []
    for index, jwk in enumerate(document["keys"]):
        if not (isinstance(jwk, dict) and jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519"):
            continue
        try:
            keys.append(_ed25519_key(jwk.get("x")))
        except ValueError as exc:
            log.warning("JWKS key %d (kid %r) skipped: %s", index, jwk.get("kid"), exc)
    if not keys:
        raise ValueError("the JWKS holds no usable Ed25519 key")
    return keys


def _ed25519_key(x: object) -> VerifyKey:
    if not isinstance(x, str):
        raise ValueError("an Ed25519 JWK's x must be a base64url string")
    try:
        raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("an Ed25519 JWK's x is not base64url") from None
    if len(raw) != 32:
        raise ValueError("an Ed25519 JWK's x must be 32 bytes")
    return VerifyKey(raw)


class JwksVerifier:
    """Verifies deliveries against a cached JWKS fetched over HTTPS."""

    def __init__(
        self,
        jwks_url: str,
        *,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        max_age: float = JWKS_MAX_AGE_SECONDS,
        min_refresh: float = JWKS_MIN_REFRESH_SECONDS,
        allow_http: bool = False,
    ) -> None:
        self.jwks_url = check_jwks_url(jwks_url, allow_http=allow_http)
        self._client = client or httpx.AsyncClient(timeout=5.0, verify=ssl_context())
        self._clock = clock
        self._max_age = max_age
        self._min_refresh = min_refresh
        self._keys: list[VerifyKey] = []
        self._fetched_at: float | None = None  # when the attempt that got `_keys` began
        self._last_attempt: float | None = None
        self._last_error: str | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def aclose(self) -> None:
        await self._client.aclose()

    def now(self) -> float:
        return self._clock()

    def _fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < self._max_age

    def _due(self, now: float) -> bool:
        return self._last_attempt is None or now - self._last_attempt >= self._min_refresh

    async def _refresh(self, *, newer_than: float | None) -> None:
        """Fetch if needed and due. `newer_than`: a forced refresh for a delivery that arrived
        then (skipped when a set fetched since is already here)."""
        async with self._lock:
            now = self._clock()
            if newer_than is None and self._fresh(now):
                return
            fetched = self._fetched_at
            if newer_than is not None and fetched is not None and fetched >= newer_than:
                return  # another delivery refreshed since this one arrived
            if not self._due(now):
                return
            self._last_attempt = now
            self.fetches += 1
            try:
                response = await self._client.get(self.jwks_url)
                response.raise_for_status()
                keys = keys_from_jwks(response.json())
            except (httpx.HTTPError, ValueError) as exc:
                self._last_error = f"{type(exc).__name__}: {exc}"
                log.error("cannot fetch the JWKS from %s: %s", self.jwks_url, self._last_error)
                return
            self._keys, self._fetched_at, self._last_error = keys, now, None

    def check_headers(self, headers: Mapping[str, str], *, window: bool = True) -> SignedHeaders:
        """Presence, shape and time window of the signature headers (before the body)."""
        return parse_headers(headers, self._clock(), window=window)

    async def verify(
        self, headers: Mapping[str, str], body: bytes, *, arrived: float | None = None
    ) -> SignedHeaders:
        """Return the verified headers or raise SignatureRejected / JwksUnavailable."""
        signed = headers if isinstance(headers, SignedHeaders) else self.check_headers(headers)
        return await self.verify_signed(signed, body, arrived=arrived)

    async def verify_signed(
        self, signed: SignedHeaders, body: bytes, *, arrived: float | None = None
    ) -> SignedHeaders:
        arrived = self._clock() if arrived is None else arrived
        if not self._fresh(self._clock()):  # the common case skips the lock
            await self._refresh(newer_than=None)
            if not self._fresh(self._clock()):
                raise JwksUnavailable(
                    f"no fresh JWKS (last fetch error: {self._last_error or 'none yet'}; "
                    f"next attempt at most once per {self._min_refresh:g} s)"
                )
        text = signed.timestamp_text or str(signed.timestamp)
        message = signed_message(signed.request_id, signed.user_id, text, body)
        if _matches(self._keys, message, signed.signature):
            return signed
        await self._refresh(newer_than=arrived)  # a rotated key?
        if _matches(self._keys, message, signed.signature):
            return signed
        if self._fetched_at is not None and self._fetched_at >= arrived:
            raise SignatureRejected("signature matches no key of the JWKS")
        raise JwksUnavailable(
            "signature matches no cached key and the key set could not be refreshed yet "
            "(a rotated key?)"
        )


def _matches(keys: list[VerifyKey], message: bytes, signature: bytes) -> bool:
    for key in keys:
        try:
            key.verify(message, signature)
            return True
        except BadSignatureError:
            continue
    return False
