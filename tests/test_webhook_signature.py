"""The verifier against a real JWKS server over HTTP, with an injected clock.

Each test drives time by hand, so intervals (the minimum refresh, the 24 h maximum age)
are checked exactly without sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from webhook_helpers import JwksServer, fal_body, jwk, signed_headers

from renderqueue_pipeline.webhook.signature import (
    JWKS_MAX_AGE_SECONDS,
    InsecureJwksUrl,
    JwksUnavailable,
    JwksVerifier,
    SignatureRejected,
    check_jwks_url,
    keys_from_jwks,
    parse_headers,
)

T0 = 1_800_000_000.0
MIN_REFRESH = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def jwks(key: Ed25519PrivateKey) -> Iterator[JwksServer]:
    server = JwksServer(key)
    yield server
    server.stop()


def delivery(key: Ed25519PrivateKey, clock: Clock, request_id: str = "r-1"):
    body = fal_body(request_id)
    return signed_headers(key, body, request_id, timestamp=int(clock.now)), body


def run(jwks: JwksServer, clock: Clock, script: Callable[[JwksVerifier], Awaitable[None]]) -> None:
    async def main() -> None:
        verifier = JwksVerifier(jwks.url, clock=clock, min_refresh=MIN_REFRESH, allow_http=True)
        try:
            await script(verifier)
        finally:
            await verifier.aclose()

    asyncio.run(main())


def test_a_failing_jwks_is_fetched_at_most_once_per_interval(
    jwks: JwksServer, key: Ed25519PrivateKey
) -> None:
    """No fresh set and the JWKS failing: one fetch, then 503 at once until the next is due."""
    clock, jwks.down = Clock(), True

    async def script(verifier: JwksVerifier) -> None:
        for step in range(20):  # genuine and forged alike
            clock.now = T0 + step
            signer = key if step % 2 else Ed25519PrivateKey.generate()
            with pytest.raises(JwksUnavailable):
                await verifier.verify(*delivery(signer, clock))
        assert jwks.hits == 1
        jwks.down = False
        clock.now = T0 + MIN_REFRESH
        await verifier.verify(*delivery(key, clock))
        assert jwks.hits == 2

    run(jwks, clock, script)


def test_a_rotated_key_before_the_refresh_is_due_is_503_not_401(
    jwks: JwksServer, key: Ed25519PrivateKey
) -> None:
    clock = Clock()
    new_key = Ed25519PrivateKey.generate()

    async def script(verifier: JwksVerifier) -> None:
        await verifier.verify(*delivery(key, clock))  # first fetch: old key only
        jwks.keys = [new_key]  # fal rotates
        clock.now = T0 + 10  # the forced refresh is not due yet
        with pytest.raises(JwksUnavailable):
            await verifier.verify(*delivery(new_key, clock))
        assert jwks.hits == 1
        clock.now = T0 + MIN_REFRESH  # fal's retry, once a refresh is due: accepted
        await verifier.verify(*delivery(new_key, clock))
        assert jwks.hits == 2

    run(jwks, clock, script)


def test_a_rotated_key_when_the_refresh_fails_is_503_not_401(
    jwks: JwksServer, key: Ed25519PrivateKey
) -> None:
    clock = Clock()
    new_key = Ed25519PrivateKey.generate()

    async def script(verifier: JwksVerifier) -> None:
        await verifier.verify(*delivery(key, clock))
        jwks.keys, jwks.down = [new_key], True
        clock.now = T0 + MIN_REFRESH
        with pytest.raises(JwksUnavailable):
            await verifier.verify(*delivery(new_key, clock))
        assert jwks.hits == 2  # it did try
        await verifier.verify(*delivery(key, clock))  # the cached set still serves

    run(jwks, clock, script)


def test_only_a_set_fetched_after_arrival_makes_a_401(
    jwks: JwksServer, key: Ed25519PrivateKey
) -> None:
    clock = Clock()
    forger = Ed25519PrivateKey.generate()

    async def script(verifier: JwksVerifier) -> None:
        await verifier.verify(*delivery(key, clock))
        clock.now = T0 + MIN_REFRESH  # a refresh is due: fetched after this arrival
        with pytest.raises(SignatureRejected):
            await verifier.verify(*delivery(forger, clock))
        assert jwks.hits == 2
        clock.now += 1
        with pytest.raises(JwksUnavailable):  # arrived after that fetch, next not due
            await verifier.verify(*delivery(forger, clock))
        assert jwks.hits == 2

    run(jwks, clock, script)


def test_the_key_set_is_used_for_at_most_24_hours(jwks: JwksServer, key: Ed25519PrivateKey) -> None:
    clock = Clock()

    async def script(verifier: JwksVerifier) -> None:
        await verifier.verify(*delivery(key, clock))
        clock.now = T0 + JWKS_MAX_AGE_SECONDS - 1
        await verifier.verify(*delivery(key, clock))
        assert jwks.hits == 1  # still fresh: no fetch
        clock.now = T0 + JWKS_MAX_AGE_SECONDS
        await verifier.verify(*delivery(key, clock))
        assert jwks.hits == 2  # expired: fetched again before verifying
        jwks.down = True
        clock.now = T0 + 2 * JWKS_MAX_AGE_SECONDS + 1
        with pytest.raises(JwksUnavailable):  # expired and cannot refetch: never stale keys
            await verifier.verify(*delivery(key, clock))

    run(jwks, clock, script)


def test_one_malformed_key_does_not_throw_away_the_good_ones(
    jwks: JwksServer, key: Ed25519PrivateKey
) -> None:
    jwks.extra = [
        {"kty": "OKP", "crv": "Ed25519", "x": 12},  # not a string
        {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"},  # 3 bytes
        {"kty": "OKP", "crv": "Ed25519", "x": "!!not base64!!"},
        {"kty": "OKP", "crv": "Ed25519"},  # no x
        {"kty": "RSA", "n": "x", "e": "AQAB"},  # another type: ignored
    ]
    clock = Clock()

    async def script(verifier: JwksVerifier) -> None:
        await verifier.verify(*delivery(key, clock))

    run(jwks, clock, script)


def test_a_jwks_without_any_usable_key_is_a_failed_fetch(jwks: JwksServer) -> None:
    assert len(keys_from_jwks({"keys": [jwk(Ed25519PrivateKey.generate())]})) == 1
    with pytest.raises(ValueError, match="no usable"):
        keys_from_jwks({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": 12}]})


@pytest.mark.parametrize(
    "text",
    ["+1800000000", " 1800000000", "1800000000 ", "1800000000.0", "١٨٠٠٠٠٠٠٠٠", "0x6B49D200"],
)
def test_the_timestamp_is_plain_digits_as_sent(text: str) -> None:
    """int() would accept most of these; the signed text must be exactly what was sent."""
    headers = {
        "x-fal-webhook-request-id": "r",
        "x-fal-webhook-user-id": "u",
        "x-fal-webhook-timestamp": text,
        "x-fal-webhook-signature": "ab" * 64,
    }
    with pytest.raises(SignatureRejected, match="Timestamp"):
        parse_headers(headers, T0)


@pytest.mark.parametrize(
    ("url", "allow_http", "ok"),
    [
        ("https://rest.alpha.fal.ai/.well-known/jwks.json", False, True),
        ("http://127.0.0.1:9/jwks.json", False, False),
        ("http://127.0.0.1:9/jwks.json", True, True),
        ("", True, False),
        ("ftp://keys/jwks.json", True, False),
    ],
)
def test_the_jwks_url_must_be_https(url: str, allow_http: bool, ok: bool) -> None:
    if ok:
        assert check_jwks_url(url, allow_http=allow_http) == url
    else:
        with pytest.raises(InsecureJwksUrl, match="FAL_JWKS_URL"):
            check_jwks_url(url, allow_http=allow_http)
