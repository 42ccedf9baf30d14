"""The webhook receiver over real HTTP: verified, idempotent, order-proof, nothing lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlparse

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ledger_helpers import generation, submit_row
from webhook_helpers import JwksServer, fal_body, serving, signed_headers

from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.ledger import LedgerEvent, expire_waiting_events, record_event
from renderqueue_pipeline.simulator.testing import wait_until
from renderqueue_pipeline.webhook.app import PROBE_INTERVAL, ReceiverConfig, create_app
from renderqueue_pipeline.webhook.committer import connection_options


@dataclass
class Receiver:
    url: str
    client: httpx.Client
    key: Ed25519PrivateKey
    jwks: JwksServer
    app: object

    def deliver(self, body: bytes, request_id: str, **header_options) -> httpx.Response:
        headers = signed_headers(self.key, body, request_id, **header_options)
        return self.client.post(f"{self.url}/webhooks/fal", content=body, headers=headers)


@contextlib.contextmanager
def running_receiver(database_url: str, **options) -> Iterator[Receiver]:
    """A receiver over real HTTP with its own JWKS server; `options` go to ReceiverConfig,
    `server` (a dict) to uvicorn.Config over the receiver's own server options."""
    key = Ed25519PrivateKey.generate()
    jwks = JwksServer(key)
    server = options.pop("server", {})
    options = {"jwks_min_refresh": 0.5, "insecure_jwks": True, **options}
    app = create_app(ReceiverConfig(database_url, jwks.url, **options))
    try:
        with serving(app, **server) as url, httpx.Client(timeout=30) as client:
            yield Receiver(url, client, key, jwks, app)
    finally:
        jwks.stop()


@pytest.fixture
def receiver(ledger_url: str, conn: psycopg.Connection) -> Iterator[Receiver]:
    with running_receiver(ledger_url) as running:
        yield running


def ledger_snapshot(conn: psycopg.Connection) -> tuple:
    generations = conn.execute("select * from generations order by id").fetchall()
    events = conn.execute("select id, outcome from generation_events order by id").fetchall()
    return generations, events


def test_completed_webhook_is_applied(receiver: Receiver, conn: psycopg.Connection) -> None:
    request_id, _ = submit_row(conn)
    answer = receiver.deliver(fal_body(request_id), request_id)
    assert (answer.status_code, answer.json()["outcome"]) == (200, "applied")
    row = generation(conn, request_id)
    assert row["status"] == "completed"
    assert row["cost_basis"] == "requested"
    # provenance: fal's payload as fal sent it, field for field (the undocumented
    # `duration` is kept, never priced from)
    assert row["outputs"] == json.loads(fal_body(request_id))["payload"]


def test_error_webhook_fails_the_row_at_no_cost(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    request_id, _ = submit_row(conn)
    body = fal_body(request_id, "ERROR", {"detail": [{"msg": "prompt rejected"}]})
    assert receiver.deliver(body, request_id).status_code == 200
    row = generation(conn, request_id)
    assert (row["status"], row["cost_micros"]) == ("failed", 0)
    assert "Invalid status code: 422" in row["error"]
    assert "prompt rejected" in row["error"]


def test_duplicates_three_times_change_nothing(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    request_id, _ = submit_row(conn)
    body = fal_body(request_id)
    assert receiver.deliver(body, request_id).json()["outcome"] == "applied"
    before = ledger_snapshot(conn)
    for _ in range(3):
        answer = receiver.deliver(body, request_id)
        assert (answer.status_code, answer.json()["outcome"]) == (200, "duplicate")
    assert ledger_snapshot(conn) == before


def test_webhook_before_its_row_is_stored_then_applied(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    request_id = f"early-{uuid.uuid4().hex}"
    answer = receiver.deliver(fal_body(request_id), request_id)
    assert (answer.status_code, answer.json()["outcome"]) == (202, "waiting")
    assert (
        "renderqueue_events_waiting_for_row 1.0"
        in receiver.client.get(f"{receiver.url}/metrics").text
    )
    submit_row(conn, request_id)
    assert generation(conn, request_id)["status"] == "completed"


def test_completed_before_in_progress(receiver: Receiver, conn: psycopg.Connection) -> None:
    request_id, _ = submit_row(conn)
    receiver.deliver(fal_body(request_id), request_id)
    assert record_event(conn, LedgerEvent(request_id, "in_progress", source="reconcile")) == "stale"
    assert generation(conn, request_id)["status"] == "completed"


def _tampered(receiver: Receiver, request_id: str) -> httpx.Response:
    body = fal_body(request_id)
    headers = signed_headers(receiver.key, body, request_id)
    return receiver.client.post(
        f"{receiver.url}/webhooks/fal",
        content=body.replace(b"output.mp4", b"evil00.mp4"),
        headers=headers,
    )


def _unsigned(receiver: Receiver, request_id: str) -> httpx.Response:
    return receiver.client.post(f"{receiver.url}/webhooks/fal", content=fal_body(request_id))


def _bad_hex(receiver: Receiver, request_id: str) -> httpx.Response:
    body = fal_body(request_id)
    headers = {**signed_headers(receiver.key, body, request_id), "x-fal-webhook-signature": "zz"}
    return receiver.client.post(f"{receiver.url}/webhooks/fal", content=body, headers=headers)


def _foreign_key(receiver: Receiver, request_id: str) -> httpx.Response:
    body = fal_body(request_id)
    headers = signed_headers(Ed25519PrivateKey.generate(), body, request_id)
    return receiver.client.post(f"{receiver.url}/webhooks/fal", content=body, headers=headers)


def _plus_timestamp(receiver: Receiver, request_id: str) -> httpx.Response:
    """Signed over "1700000000" but sent as "+1700000000": the header text is what is signed."""
    body = fal_body(request_id)
    headers = signed_headers(receiver.key, body, request_id)
    headers["x-fal-webhook-timestamp"] = "+" + headers["x-fal-webhook-timestamp"]
    return receiver.client.post(f"{receiver.url}/webhooks/fal", content=body, headers=headers)


REJECTIONS = {
    "too large": (413, lambda r, rid: r.deliver(b"x" * (1024 * 1024 + 1), rid)),
    "no signature headers": (401, _unsigned),
    "signature not hex": (401, _bad_hex),
    "timestamp 4 h old (past fal's retries)": (
        401,
        lambda r, rid: r.deliver(fal_body(rid), rid, timestamp=int(time.time()) - 4 * 3600),
    ),
    "timestamp with a plus sign": (401, _plus_timestamp),
    "tampered body": (401, _tampered),
    "signed by another key": (401, _foreign_key),
    "not JSON": (400, lambda r, rid: r.deliver(b"{not json", rid)),
    "header id differs from body": (400, lambda r, rid: r.deliver(fal_body("someone-else"), rid)),
    "unknown status": (400, lambda r, rid: r.deliver(fal_body(rid, status="MAYBE"), rid)),
}


@pytest.mark.parametrize("case", list(REJECTIONS), ids=list(REJECTIONS))
def test_rejections_leave_the_ledger_unchanged(
    receiver: Receiver, conn: psycopg.Connection, case: str
) -> None:
    request_id, _ = submit_row(conn)
    before = ledger_snapshot(conn)
    status, send = REJECTIONS[case]
    answer = send(receiver, request_id)
    assert answer.status_code == status, answer.text
    assert ledger_snapshot(conn) == before


#: the receiver's pinned "now" (unix seconds) for the window's edges
PINNED_NOW = 1_796_515_668

#: signed timestamp minus the receiver's now -> (answer with a row, answer without one).
#: ±300 s is inside fal's window; 301 s ahead is refused; 301 s old is a late retry,
#: accepted only for a request we know (fal retries over about 2 hours).
WINDOW_EDGES = {
    +300: ((200, "applied"), (202, "waiting")),
    -300: ((200, "applied"), (202, "waiting")),
    +301: ((401, "bad_signature"), (401, "bad_signature")),
    -301: ((200, "applied"), (401, "bad_signature")),
}


@pytest.fixture
def pinned_receiver(ledger_url: str, conn: psycopg.Connection) -> Iterator[Receiver]:
    """A receiver whose clock stands still at PINNED_NOW: the window's edges are exact."""
    with running_receiver(ledger_url, clock=lambda: float(PINNED_NOW)) as running:
        yield running


@pytest.mark.parametrize("offset", list(WINDOW_EDGES), ids=[f"{o:+d}s" for o in WINDOW_EDGES])
@pytest.mark.parametrize("has_row", [True, False], ids=["with row", "without row"])
def test_the_300_second_window_is_exact_at_its_edges(
    pinned_receiver: Receiver, conn: psycopg.Connection, offset: int, has_row: bool
) -> None:
    if has_row:
        request_id, _ = submit_row(conn)
    else:
        request_id = f"early-{uuid.uuid4().hex}"
    before = ledger_snapshot(conn)
    answer = pinned_receiver.deliver(
        fal_body(request_id), request_id, timestamp=PINNED_NOW + offset
    )
    expected = WINDOW_EDGES[offset][0 if has_row else 1]
    assert (answer.status_code, answer.json()["outcome"]) == expected, answer.text
    if expected[0] == 401:
        assert ledger_snapshot(conn) == before  # refused: nothing stored


def test_jwks_rotation(receiver: Receiver, conn: psycopg.Connection) -> None:
    """A rotated key is picked up by a refresh; until one is due, 503 (fal retries)."""
    old_key = receiver.key
    first, _ = submit_row(conn)
    assert receiver.deliver(fal_body(first), first).status_code == 200
    new_key = Ed25519PrivateKey.generate()
    receiver.jwks.keys = [new_key]  # fal rotates: new key served, old key removed
    receiver.key = new_key
    second, _ = submit_row(conn)
    answers = retry_until_final(lambda: receiver.deliver(fal_body(second), second))
    assert answers[-1].status_code == 200
    assert {a.status_code for a in answers} <= {200, 503}
    receiver.key = old_key
    third, _ = submit_row(conn)
    answers = retry_until_final(lambda: receiver.deliver(fal_body(third), third))
    assert answers[-1].status_code == 401  # against a key set fetched after it arrived
    assert generation(conn, third)["status"] == "submitted"


def retry_until_final(send, timeout: float = 30) -> list[httpx.Response]:
    """Send as fal would: again after each 503, until another answer (generous deadline)."""
    answers = [send()]
    deadline = time.monotonic() + timeout
    while answers[-1].status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.1)
        answers.append(send())
    return answers


def test_forged_requests_do_not_hammer_the_jwks_endpoint(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    request_id, _ = submit_row(conn)
    receiver.deliver(fal_body(request_id), request_id)
    hits = receiver.jwks.hits
    for _ in range(20):  # 401 after a refresh, 503 while the next one is not due
        assert _foreign_key(receiver, request_id).status_code in (401, 503)
    assert receiver.jwks.hits - hits <= 1 + 1  # plus one if the 0.5 s interval passed


def test_jwks_down_without_a_cached_key_is_503(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    assert receiver.jwks.hits == 0  # nothing cached yet: the first delivery must fetch
    receiver.jwks.down = True
    request_id, _ = submit_row(conn)
    answer = receiver.deliver(fal_body(request_id), request_id)
    assert answer.status_code == 503
    assert answer.headers["retry-after"]
    assert receiver.jwks.hits == 1  # it asked the down server
    assert generation(conn, request_id)["status"] == "submitted"
    receiver.jwks.down = False
    answers = retry_until_final(lambda: receiver.deliver(fal_body(request_id), request_id))
    assert answers[-1].status_code == 200


def test_jwks_down_with_a_cached_key_still_verifies(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    first, _ = submit_row(conn)
    assert receiver.deliver(fal_body(first), first).status_code == 200
    receiver.jwks.down = True
    second, _ = submit_row(conn)
    assert receiver.deliver(fal_body(second), second).status_code == 200


def test_database_unreachable_is_503_and_healthz_says_so(make_database) -> None:
    key = Ed25519PrivateKey.generate()
    jwks = JwksServer(key)
    dead = make_database().rsplit("/", 1)[0] + "/no_such_database"
    config = ReceiverConfig(dead, jwks.url, insecure_jwks=True)
    try:
        with serving(create_app(config)) as url, httpx.Client() as client:
            body = fal_body("r-1")
            answer = client.post(
                f"{url}/webhooks/fal", content=body, headers=signed_headers(key, body, "r-1")
            )
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "5"
            health = client.get(f"{url}/healthz")
            assert health.status_code == 503
            assert "no_such_database" not in answer.text + health.text
    finally:
        jwks.stop()


def test_healthz_and_metrics(receiver: Receiver, conn: psycopg.Connection) -> None:
    assert receiver.client.get(f"{receiver.url}/healthz").json() == {"ok": True}
    request_id, _ = submit_row(conn)
    receiver.deliver(fal_body(request_id), request_id)
    receiver.deliver(fal_body(request_id), request_id)
    _unsigned(receiver, request_id)
    text = receiver.client.get(f"{receiver.url}/metrics").text
    assert 'renderqueue_webhook_deliveries_total{outcome="applied"} 1.0' in text
    assert 'renderqueue_webhook_deliveries_total{outcome="duplicate"} 1.0' in text
    assert 'renderqueue_webhook_deliveries_total{outcome="bad_signature"} 1.0' in text
    assert "renderqueue_webhook_latency_seconds_bucket" in text
    # two stored deliveries, one batch each (sequential); the unsigned one never queued
    assert "renderqueue_webhook_batch_events_count 2.0" in text
    assert "renderqueue_webhook_batch_events_sum 2.0" in text
    assert "renderqueue_webhook_commit_seconds_count 2.0" in text


def test_concurrent_deliveries_share_transactions(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    ids = [submit_row(conn)[0] for _ in range(64)]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=10) as client:
            answers = await asyncio.gather(
                *(
                    client.post(
                        f"{receiver.url}/webhooks/fal",
                        content=(b := fal_body(r)),
                        headers=signed_headers(receiver.key, b, r),
                    )
                    for r in ids
                )
            )
        return [a.status_code for a in answers]

    assert asyncio.run(burst()) == [200] * 64
    committer = receiver.app.state.committer
    assert committer.committed == 64
    assert committer.batches < 64
    assert sum(committer.batch_sizes) == 64
    assert max(committer.batch_sizes) > 1  # shared
    text = receiver.client.get(f"{receiver.url}/metrics").text
    assert "renderqueue_webhook_batch_events_sum 64.0" in text
    assert f"renderqueue_webhook_batch_events_count {committer.batches}.0" in text
    done = conn.execute(
        "select count(*) as n from generations where status = 'completed'"
    ).fetchone()
    assert done["n"] == 64


def test_logs_name_the_request_but_not_the_body(
    receiver: Receiver, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="renderqueue.webhook")
    request_id, _ = submit_row(conn)
    body = fal_body(request_id)
    receiver.deliver(body, request_id)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert f"request_id={request_id}" in logged
    assert "outcome=applied" in logged
    assert json.loads(body)["payload"]["video"]["url"] not in logged


def test_webhook_serve_command(ledger_url: str, tmp_path) -> None:
    """`renderqueue webhook serve` as a user starts it: real process, real port."""

    key = Ed25519PrivateKey.generate()
    jwks = JwksServer(key)
    env = {
        **os.environ,
        "DATABASE_URL": ledger_url,
        "FAL_JWKS_URL": jwks.url,
        "RENDERQUEUE_HOME": str(tmp_path),
    }
    env.pop("FAL_WEBHOOK_USER_IDS", None)
    command = [sys.executable, "-m", "renderqueue_pipeline.cli", "webhook", "serve"]
    proc = subprocess.Popen(
        [*command, "--port", "0", "--insecure-jwks"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines, port = [], None
        for line in proc.stdout:  # the port it bound, as it says once bound; then the app
            lines.append(line)
            if found := re.search(r"serving on http://127\.0\.0\.1:(\d+)", line):
                port = int(found.group(1))
                # listening once printed, before the app has even loaded: never refused
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            if port is not None and "FAL_WEBHOOK_USER_IDS is not set" in line:
                break
        else:
            raise AssertionError("the receiver did not start and warn:\n" + "".join(lines))
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert health.json() == {"ok": True}
        body = fal_body("cli-early")
        answer = httpx.post(
            f"http://127.0.0.1:{port}/webhooks/fal",
            content=body,
            headers=signed_headers(key, body, "cli-early"),
        )
        assert (answer.status_code, answer.json()["outcome"]) == (202, "waiting")
    finally:
        proc.terminate()
        proc.wait(10)
        jwks.stop()
        with psycopg.connect(ledger_url) as conn:
            conn.execute("delete from generation_events where request_id = 'cli-early'")


DURATION_PRICED = "test/priced-by-output-duration"


@pytest.fixture
def priced_by_output_duration(conn: psycopg.Connection) -> Iterator[str]:
    """A price that reads the clip's length from the output (removed after the test)."""
    conn.execute(
        "insert into prices (endpoint, micros_per_second, default_seconds, output_seconds_path,"
        " effective_from, price_version, source) values (%s, 100000, 5, '{video,duration}',"
        " '2020-01-01', 'test', 'test')",
        (DURATION_PRICED,),
    )
    conn.commit()
    try:
        yield DURATION_PRICED
    finally:
        conn.rollback()
        conn.execute("delete from generations where endpoint = %s", (DURATION_PRICED,))
        conn.execute("delete from prices where endpoint = %s", (DURATION_PRICED,))
        conn.commit()


def test_an_event_postgres_refuses_is_422_and_spares_its_batch(
    receiver: Receiver, conn: psycopg.Connection, priced_by_output_duration: str
) -> None:
    """A content error (SQLSTATE class 22: a duration whose cost no column can hold) is the
    event's fault: that delivery gets 422 without database text, its neighbours are stored."""
    good, _ = submit_row(conn)
    bad, _ = submit_row(conn, endpoint=priced_by_output_duration, inputs={"prompt": "x"})
    bad_body = fal_body(bad, payload={"video": {"url": "https://x/a.mp4", "duration": 1e300}})

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{receiver.url}/webhooks/fal",
                        content=body,
                        headers=signed_headers(receiver.key, body, rid),
                    )
                    for rid, body in ((bad, bad_body), (good, fal_body(good)))
                )
            )

    bad_answer, good_answer = asyncio.run(both())
    assert (bad_answer.status_code, bad_answer.json()["outcome"]) == (422, "not_storable")
    assert "out of range" not in bad_answer.text
    assert "overflow" not in bad_answer.text
    assert good_answer.status_code == 200
    assert generation(conn, bad)["status"] == "submitted"
    assert generation(conn, good)["status"] == "completed"


# -- a genuine delivery is never lost to what Postgres cannot hold ------------------------


def test_a_payload_jsonb_cannot_hold_is_stored_escaped_and_applied(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    """\\u0000 (and lone surrogates) become U+FFFD: the completion is stored and applied."""
    request_id, _ = submit_row(conn)
    payload = {
        "video": {"url": "https://v3b.fal.media/files/b/x/out.mp4", "duration": 5},
        "note": "a\u0000b",
        "odd\ud800key": ["\udfff"],
    }
    body = json.dumps({"request_id": request_id, "status": "OK", "payload": payload}).encode()
    answer = receiver.deliver(body, request_id)
    assert (answer.status_code, answer.json()["outcome"]) == (200, "applied"), answer.text
    assert generation(conn, request_id)["status"] == "completed"
    stored = conn.execute(
        "select payload from generation_events where request_id = %s", (request_id,)
    ).fetchone()["payload"]
    assert stored["note"] == "a\ufffdb"
    assert stored["odd\ufffdkey"] == ["\ufffd"]
    assert receiver.deliver(body, request_id).json()["outcome"] == "duplicate"


# -- fal accounts ----------------------------------------------------------------------


def test_webhooks_of_another_fal_account_are_403_and_not_stored(
    ledger_url: str, conn: psycopg.Connection
) -> None:
    with running_receiver(ledger_url, user_ids=frozenset({"user-1", "user-7"})) as receiver:
        request_id, _ = submit_row(conn)
        before = ledger_snapshot(conn)
        answer = receiver.deliver(fal_body(request_id), request_id, user_id="user-2")
        assert (answer.status_code, answer.json()["outcome"]) == (403, "foreign_user")
        assert ledger_snapshot(conn) == before
        early = f"early-{uuid.uuid4().hex}"  # nor stored to wait for a row
        assert receiver.deliver(fal_body(early), early, user_id="user-2").status_code == 403
        assert ledger_snapshot(conn) == before
        answer = receiver.deliver(fal_body(request_id), request_id, user_id="user-7")
        assert answer.status_code == 200


# -- refused before the body is read ---------------------------------------------------


def raw_request(url: str, head: dict[str, str], body: bytes = b"", *, length: int) -> bytes:
    """Send a POST head (Content-Length `length`) and `body`; the first bytes answered."""
    host, port = url.removeprefix("http://").split(":")
    lines = ["POST /webhooks/fal HTTP/1.1", f"Host: {host}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in head.items()]
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return sock.recv(4096)


HEADER_REFUSALS = {
    "no signature headers": ({}, 401),
    "timestamp an hour ahead": ({"x-fal-webhook-timestamp": str(int(time.time()) + 3600)}, 401),
    "timestamp a day old": ({"x-fal-webhook-timestamp": str(int(time.time()) - 86400)}, 401),
    "signature not hex": ({"x-fal-webhook-signature": "zz"}, 401),
    "foreign fal account": ({"x-fal-webhook-user-id": "user-2"}, 403),
}


@pytest.mark.parametrize("case", list(HEADER_REFUSALS), ids=list(HEADER_REFUSALS))
def test_bad_headers_are_refused_before_the_body_is_read(
    ledger_url: str, conn: psycopg.Connection, case: str
) -> None:
    """The answer comes while the client still owes the whole body."""
    override, status = HEADER_REFUSALS[case]
    with running_receiver(ledger_url, user_ids=frozenset({"user-1"})) as receiver:
        head = signed_headers(receiver.key, b"{}", "r-1")
        head = {k: v for k, v in head.items() if case != "no signature headers"}
        head.update(override)
        answer = raw_request(receiver.url, head, length=50_000)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer


def _send_head(url: str, head: dict[str, str], length: int, body: bytes = b"") -> socket.socket:
    """A connection that has sent a POST head (Content-Length `length`) and `body`."""
    host, port = url.removeprefix("http://").split(":")
    lines = ["POST /webhooks/fal HTTP/1.1", f"Host: {host}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in head.items()]
    sock = socket.create_connection((host, int(port)), timeout=20)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def test_with_too_many_bodies_being_read_the_oldest_is_cut_off_not_the_newcomer(
    ledger_url: str, conn: psycopg.Connection
) -> None:
    """Bodies read at once stay bounded, and a crowd of slow senders cannot keep fal out."""
    with running_receiver(ledger_url, max_reading=1) as receiver:
        slow_id, _ = submit_row(conn)
        other_id, _ = submit_row(conn)
        body = fal_body(slow_id)
        head = signed_headers(receiver.key, body, slow_id)
        endpoint = receiver.app.state.endpoint
        with _send_head(receiver.url, head, len(body), body[:10]) as slow:
            wait_until(lambda: endpoint.reading == 1, timeout=20)
            assert receiver.deliver(fal_body(other_id), other_id).status_code == 200
            answer = slow.recv(4096)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b'"outcome":"busy"' in answer
            assert b"retry-after: 5" in answer.lower()
            assert endpoint.reading == 0
        # fal's retry of the delivery that was cut off lands
        assert receiver.deliver(body, slow_id).status_code == 200
        assert generation(conn, slow_id)["status"] == "completed"


def test_a_body_streamed_without_content_length_is_cut_at_the_limit(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    request_id, _ = submit_row(conn)
    sent = []

    def chunks() -> Iterator[bytes]:
        for _ in range(64):  # 64 x 64 KiB = 4 MiB, chunked, no Content-Length
            sent.append(1)
            yield b"x" * 65536

    headers = signed_headers(receiver.key, b"", request_id)
    with contextlib.suppress(httpx.TransportError):  # the server may close mid-upload
        answer = receiver.client.post(
            f"{receiver.url}/webhooks/fal", content=chunks(), headers=headers
        )
        assert "content-length" not in answer.request.headers
        assert (answer.status_code, answer.json()["outcome"]) == (413, "too_large")
    text = receiver.client.get(f"{receiver.url}/metrics").text
    assert 'renderqueue_webhook_deliveries_total{outcome="too_large"} 1.0' in text
    assert generation(conn, request_id)["status"] == "submitted"


def test_a_client_leaving_mid_body_is_logged_as_such_not_a_500(
    receiver: Receiver, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    request_id, _ = submit_row(conn)
    body = fal_body(request_id)
    host, port = receiver.url.removeprefix("http://").split(":")
    head = signed_headers(receiver.key, body, request_id)
    lines = ["POST /webhooks/fal HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in head.items()]
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body[:10])
        wait_until(lambda: receiver.app.state.endpoint.reading == 1, timeout=20)
    metric = 'renderqueue_webhook_deliveries_total{outcome="client_disconnected"} 1.0'
    wait_until(lambda: metric in receiver.client.get(f"{receiver.url}/metrics").text, timeout=20)
    assert f"webhook {request_id}: client disconnected mid-body" in caplog.text
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text
    assert "Traceback" not in caplog.text


# -- bounded waits: 503 instead of a hang -----------------------------------------------


@contextlib.contextmanager
def row_locked(ledger_url: str, request_id: str) -> Iterator[None]:
    """Hold the generation row's lock in another transaction (the receiver's batch waits)."""
    with psycopg.connect(ledger_url) as holder:
        holder.execute("select 1 from generations where request_id = %s for update", (request_id,))
        yield
        holder.rollback()


def test_a_delivery_past_its_deadline_is_503_and_its_retry_lands_once(
    ledger_url: str, conn: psycopg.Connection
) -> None:
    # the batch itself would wait a minute for the lock: the delivery's deadline answers
    with running_receiver(ledger_url, delivery_deadline=1.0, commit_timeout=60) as receiver:
        request_id, _ = submit_row(conn)
        conn.commit()
        with row_locked(ledger_url, request_id):
            began = time.monotonic()
            answer = receiver.deliver(fal_body(request_id), request_id)
            assert time.monotonic() - began < 30  # generous: the point is not 60 s
            assert (answer.status_code, answer.json()["outcome"]) == (503, "database_unavailable")
            assert answer.headers["retry-after"]
        answers = retry_until_final(lambda: receiver.deliver(fal_body(request_id), request_id))
        assert answers[-1].status_code == 200
        assert generation(conn, request_id)["status"] == "completed"
        events = conn.execute(
            "select count(*) as n from generation_events where request_id = %s", (request_id,)
        ).fetchone()
        assert events["n"] == 1


def test_the_queue_of_deliveries_waiting_for_a_commit_is_bounded(
    ledger_url: str, conn: psycopg.Connection
) -> None:
    with running_receiver(ledger_url, max_pending=1) as receiver:
        stuck, queued, refused = (submit_row(conn)[0] for _ in range(3))
        conn.commit()
        committer = receiver.app.state.committer
        with ThreadPoolExecutor(2) as pool, row_locked(ledger_url, stuck):
            first = pool.submit(receiver.deliver, fal_body(stuck), stuck)
            # the flusher took it and waits on the lock; the queue is empty again
            wait_until(lambda: committer.queued == 0 and _flusher_busy(receiver), timeout=20)
            second = pool.submit(receiver.deliver, fal_body(queued), queued)
            wait_until(lambda: committer.queued == 1, timeout=20)
            answer = receiver.deliver(fal_body(refused), refused)
            assert (answer.status_code, answer.json()["outcome"]) == (503, "database_unavailable")
        assert first.result().status_code == 200
        assert second.result().status_code == 200
        assert generation(conn, refused)["status"] == "submitted"
        assert receiver.deliver(fal_body(refused), refused).status_code == 200


def _flusher_busy(receiver: Receiver) -> bool:
    """True once the delivery is inside a batch (its statement waits on the row lock)."""
    with psycopg.connect(receiver.app.state.committer._url) as probe:
        row = probe.execute(
            "select count(*) as n from pg_stat_activity "
            "where wait_event_type = 'Lock' and query like '%rq_record_events%'"
        ).fetchone()
    return row[0] > 0


def test_flusher_connections_have_connect_timeout_and_keepalives() -> None:

    options = connection_options(10.0)
    assert 0 < options["connect_timeout"] <= 5
    assert options["keepalives"] == 1
    assert options["keepalives_idle"] > 0
    assert "statement_timeout=10000" in options["options"]


# -- cheap probes ----------------------------------------------------------------------


def _sessions(admin: psycopg.Connection, database: str) -> int:
    admin.execute("select pg_stat_clear_snapshot()")
    row = admin.execute(
        "select sessions from pg_stat_database where datname = %s", (database,)
    ).fetchone()
    return row[0]


def test_healthz_and_metrics_do_not_open_a_connection_per_hit(
    make_database, admin_url: str
) -> None:

    url = make_database()
    migrate(url)
    database = urlparse(url).path.lstrip("/")
    with (
        psycopg.connect(admin_url, autocommit=True) as admin,
        running_receiver(url) as receiver,
    ):
        assert receiver.client.get(f"{receiver.url}/healthz").status_code == 200
        before = _sessions(admin, database)
        reads_before = receiver.app.state.probe.reads
        started = time.monotonic()
        for _ in range(25):
            assert receiver.client.get(f"{receiver.url}/healthz").status_code == 200
            assert receiver.client.get(f"{receiver.url}/metrics").status_code == 200
        elapsed = time.monotonic() - started
        time.sleep(1)  # let any session that ended report itself
        assert _sessions(admin, database) - before <= 2
        # at most one read per interval, reused by every hit in between (one read per hit
        # would be 50)
        reads = receiver.app.state.probe.reads - reads_before
        assert reads <= 1 + elapsed / PROBE_INTERVAL, (reads, elapsed)


# -- late retries ----------------------------------------------------------------------


def test_a_late_retry_of_a_request_we_know_is_accepted(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    """fal may keep the first attempt's timestamp on retries over ~2 hours."""
    request_id, _ = submit_row(conn)
    answer = receiver.deliver(fal_body(request_id), request_id, timestamp=int(time.time()) - 3600)
    assert (answer.status_code, answer.json()["outcome"]) == (200, "applied")
    assert generation(conn, request_id)["status"] == "completed"


def test_a_late_delivery_for_an_unknown_request_is_401_and_not_stored(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    unknown = f"early-{uuid.uuid4().hex}"
    answer = receiver.deliver(fal_body(unknown), unknown, timestamp=int(time.time()) - 3600)
    assert answer.status_code == 401
    known, _ = submit_row(conn)
    too_old = receiver.deliver(fal_body(known), known, timestamp=int(time.time()) - 4 * 3600)
    assert too_old.status_code == 401
    assert ledger_snapshot(conn)[1] == []  # no event stored


def test_metrics_count_events_that_expired_waiting_for_their_row(
    receiver: Receiver, conn: psycopg.Connection
) -> None:

    stranger = f"other-account-{uuid.uuid4().hex}"
    assert receiver.deliver(fal_body(stranger), stranger).status_code == 202
    assert expire_waiting_events(conn, timedelta(0)) == 1
    metric = "renderqueue_events_expired 1.0"
    # read through the cached probe: at most once a second, so wait for the next read
    wait_until(lambda: metric in receiver.client.get(f"{receiver.url}/metrics").text, timeout=20)
