"""Nobody without fal's key can lock the receiver out: slow bodies, half-sent heads, huge
heads, deeply nested JSON. All traffic to 127.0.0.1; every attack loop is bounded."""

from __future__ import annotations

import json
import socket
import time

import httpx
import psycopg
import pytest
from ledger_helpers import generation, submit_row
from test_webhook_receiver import running_receiver
from webhook_helpers import fal_body, signed_headers

from renderqueue_pipeline.webhook.limits import GuardedHttpToolsProtocol
from renderqueue_pipeline.webhook.testing import SlowSenders

pytestmark = pytest.mark.slow  # slow senders held open against a live receiver


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _raw(url: str, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` on a new connection; everything answered until the server closes."""
    with socket.create_connection(_address(url), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and b"connection: close" not in answer.lower():
                break
        return answer


def test_request_headers_over_the_cap_are_431_and_the_connection_closed(
    ledger_url: str, conn: psycopg.Connection
) -> None:
    with running_receiver(ledger_url) as receiver:
        for size in (40 * 1024, 2 * 1024 * 1024):  # 40 KiB; the 2 MB the issue sent
            head = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {'a' * size}\r\n\r\n"
            answer = _raw(receiver.url, head.encode())
            assert answer.startswith(b"HTTP/1.1 431 "), (size, answer[:200])
        # a head of normal size still gets in
        assert receiver.client.get(f"{receiver.url}/healthz").status_code == 200


def test_a_connection_that_never_finishes_its_head_is_closed(
    ledger_url: str, conn: psycopg.Connection
) -> None:
    quick = type("QuickHeads", (GuardedHttpToolsProtocol,), {"header_timeout": 0.5})
    with (
        running_receiver(ledger_url, server={"http": quick}) as receiver,
        socket.create_connection(_address(receiver.url), timeout=10) as sock,
    ):
        sock.sendall(b"POST /webhooks/fal HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        assert sock.recv(4096) == b""  # closed by the server, not by our 10 s timeout
        assert time.monotonic() - started < 5


def test_json_nested_too_deep_is_422_too_deep_and_not_stored(
    ledger_url: str, conn: psycopg.Connection
) -> None:
    """A genuine fal body nests a few levels; 200,000 deep was a 500 RecursionError."""
    deep_ids = [submit_row(conn)[0] for _ in range(2)]
    request_id, _ = submit_row(conn)
    with running_receiver(ledger_url) as receiver:
        for depth, deep_id in zip((65, 200_000), deep_ids, strict=True):
            deep = "[" * depth + "]" * depth
            body = fal_body(deep_id, payload={"video": "PLACEHOLDER"}).replace(
                b'"PLACEHOLDER"', deep.encode()
            )
            answer = receiver.deliver(body, deep_id)
            assert (answer.status_code, answer.json()["outcome"]) == (422, "too_deep"), depth
        # 60 levels (more than fal ever sends) are fine
        nested: object = 1
        for _ in range(58):
            nested = [nested]
        document = json.loads(fal_body(request_id))
        document["payload"]["extra"] = nested  # object, object, then 58 arrays
        body = json.dumps(document).encode()
        assert receiver.deliver(body, request_id).status_code == 200
    assert [generation(conn, i)["status"] for i in deep_ids] == ["submitted", "submitted"]


def test_slow_bodies_and_half_sent_heads_cannot_lock_out_fal_or_healthz(
    ledger_url: str, conn: psycopg.Connection
) -> None:
    """300 bodies trickled a byte a second and 1,030 heads a line a second, each reopened
    as soon as it is cut off, for 12 s: a genuine delivery sent every 2 s is accepted at
    its first attempt and /healthz answers. (Today: 503 `busy` / uvicorn's 503 for as long
    as the crowd lasts. The 45 s run is `python -m bench lockout`, docs/webhook.md.)"""
    with running_receiver(ledger_url, server={"limit_concurrency": 1024}) as receiver:
        host, port = _address(receiver.url)
        request_ids = [submit_row(conn)[0] for _ in range(5)]
        with (
            SlowSenders(host, port, 300, mode="body") as bodies,
            SlowSenders(host, port, 1030, mode="head") as heads,
            httpx.Client(timeout=10) as client,
        ):
            assert bodies.opened >= 300
            assert heads.opened >= 1030
            time.sleep(2)  # let the crowd settle on the receiver
            answers, health = [], []
            for request_id in request_ids:
                body = fal_body(request_id)
                headers = signed_headers(receiver.key, body, request_id)
                url = f"{receiver.url}/webhooks/fal"
                answers.append(client.post(url, content=body, headers=headers).status_code)
                health.append(client.get(f"{receiver.url}/healthz").status_code)
                time.sleep(2)
            assert bodies.held > 250
            assert heads.held > 1000  # the crowd was there all along
        assert answers == [200] * 5, answers
        assert health == [200] * 5, health
        assert bodies.cut > 300  # slow bodies were cut off (and came back)
        metrics = receiver.client.get(f"{receiver.url}/metrics").text
        assert 'renderqueue_webhook_deliveries_total{outcome="slow_body"}' in metrics
    for request_id in request_ids:
        assert generation(conn, request_id)["status"] == "completed"


def test_a_body_behind_the_minimum_rate_is_503_slow_body_and_closed(
    ledger_url: str, conn: psycopg.Connection
) -> None:
    """A body behind the minimum rate after the grace: cut off (503, fal would retry), the
    connection closed."""
    options = {"body_grace": 0.5, "body_min_rate": 1000.0}
    with running_receiver(ledger_url, **options) as receiver:
        request_id, _ = submit_row(conn)
        body = fal_body(request_id)
        head = signed_headers(receiver.key, body, request_id)
        lines = ["POST /webhooks/fal HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in head.items()]
        with socket.create_connection(_address(receiver.url), timeout=10) as sock:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body[:1])
            started = time.monotonic()
            answer = b""  # one byte, then nothing: behind 1,000 bytes/s once the grace ends
            while chunk := sock.recv(65536):
                answer += chunk
            assert time.monotonic() - started < 5
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b'"outcome":"slow_body"' in answer
        assert b"connection: close" in answer.lower()
        assert b"retry-after: 5" in answer.lower()
        assert generation(conn, request_id)["status"] == "submitted"
        # sent at full speed, the same delivery lands
        assert receiver.deliver(body, request_id).status_code == 200
