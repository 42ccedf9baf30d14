"""The webhook receiver over real HTTP: verified, idempotent, order-proof, nothing lost."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ledger_helpers import generation, submit_row
from webhook_helpers import JwksServer, fal_body, serving, signed_headers

from renderqueue_pipeline.ledger import LedgerEvent, record_event
from renderqueue_pipeline.webhook.app import ReceiverConfig, create_app


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


@pytest.fixture
def receiver(ledger_url: str, conn: psycopg.Connection) -> Iterator[Receiver]:
    key = Ed25519PrivateKey.generate()
    jwks = JwksServer(key)
    app = create_app(ReceiverConfig(ledger_url, jwks.url, jwks_min_refresh=0.5))
    try:
        with serving(app) as url, httpx.Client(timeout=10) as client:
            yield Receiver(url, client, key, jwks, app)
    finally:
        jwks.stop()


def ledger_snapshot(conn: psycopg.Connection) -> tuple:
    generations = conn.execute("select * from generations order by id").fetchall()
    events = conn.execute("select id, outcome from generation_events order by id").fetchall()
    return generations, events


def test_completed_webhook_is_applied(receiver: Receiver, conn: psycopg.Connection) -> None:
    request_id, _ = submit_row(conn)
    answer = receiver.deliver(fal_body(request_id), request_id)
    assert (answer.status_code, answer.json()["outcome"]) == (200, "applied")
    row = generation(conn, request_id)
    assert row["status"] == "completed" and row["cost_basis"] == "requested"
    assert row["outputs"]["original_url"].endswith("/output.mp4")


def test_error_webhook_fails_the_row_at_no_cost(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    request_id, _ = submit_row(conn)
    body = fal_body(request_id, "ERROR", {"detail": [{"msg": "prompt rejected"}]})
    assert receiver.deliver(body, request_id).status_code == 200
    row = generation(conn, request_id)
    assert (row["status"], row["cost_micros"]) == ("failed", 0)
    assert "Invalid status code: 422" in row["error"] and "prompt rejected" in row["error"]


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


REJECTIONS = {
    "too large": (413, lambda r, rid: r.deliver(b"x" * (1024 * 1024 + 1), rid)),
    "no signature headers": (401, _unsigned),
    "signature not hex": (401, _bad_hex),
    "timestamp 301 s old": (
        401,
        lambda r, rid: r.deliver(fal_body(rid), rid, timestamp=int(time.time()) - 301),
    ),
    "timestamp 301 s ahead": (
        401,
        lambda r, rid: r.deliver(fal_body(rid), rid, timestamp=int(time.time()) + 301),
    ),
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


def test_timestamp_within_the_window_is_accepted(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    request_id, _ = submit_row(conn)
    answer = receiver.deliver(fal_body(request_id), request_id, timestamp=int(time.time()) - 290)
    assert answer.status_code == 200


def test_jwks_rotation(receiver: Receiver, conn: psycopg.Connection) -> None:
    old_key = receiver.key
    first, _ = submit_row(conn)
    assert receiver.deliver(fal_body(first), first).status_code == 200
    new_key = Ed25519PrivateKey.generate()
    receiver.jwks.keys = [new_key]  # fal rotates: new key served, old key removed
    time.sleep(0.6)  # past the (test-sized) minimum refresh interval
    receiver.key = new_key
    second, _ = submit_row(conn)
    assert receiver.deliver(fal_body(second), second).status_code == 200
    receiver.key = old_key
    third, _ = submit_row(conn)
    assert receiver.deliver(fal_body(third), third).status_code == 401
    assert generation(conn, third)["status"] == "submitted"


def test_forged_requests_do_not_hammer_the_jwks_endpoint(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    request_id, _ = submit_row(conn)
    receiver.deliver(fal_body(request_id), request_id)
    hits = receiver.jwks.hits
    for _ in range(20):
        assert _foreign_key(receiver, request_id).status_code == 401
    assert receiver.jwks.hits - hits <= 1


def test_jwks_down_without_a_cached_key_is_503(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    receiver.jwks.down = True
    request_id, _ = submit_row(conn)
    answer = receiver.deliver(fal_body(request_id), request_id)
    assert answer.status_code == 503 and answer.headers["retry-after"]
    assert generation(conn, request_id)["status"] == "submitted"
    receiver.jwks.down = False
    assert receiver.deliver(fal_body(request_id), request_id).status_code == 200


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
    try:
        with serving(create_app(ReceiverConfig(dead, jwks.url))) as url, httpx.Client() as client:
            body = fal_body("r-1")
            answer = client.post(
                f"{url}/webhooks/fal", content=body, headers=signed_headers(key, body, "r-1")
            )
            assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
            assert client.get(f"{url}/healthz").status_code == 503
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
    assert committer.committed == 64 and committer.batches < 64
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
    assert f"request_id={request_id}" in logged and "outcome=applied" in logged
    assert json.loads(body)["payload"]["video"]["url"] not in logged


def test_webhook_serve_command(ledger_url: str, tmp_path) -> None:
    """`renderqueue webhook serve` as a user starts it: real process, real port."""
    import os
    import subprocess
    import sys

    from webhook_helpers import JwksServer

    from renderqueue_pipeline.simulator.server import free_port

    key = Ed25519PrivateKey.generate()
    jwks = JwksServer(key)
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": ledger_url,
        "FAL_JWKS_URL": jwks.url,
        "RENDERQUEUE_HOME": str(tmp_path),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "renderqueue_pipeline.cli", "webhook", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the receiver did not start"
                time.sleep(0.1)
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


def test_an_event_postgres_cannot_store_is_422_and_spares_its_batch(
    receiver: Receiver, conn: psycopg.Connection
) -> None:
    """jsonb refuses \\u0000; that delivery gets 422, its batch neighbours are stored."""
    good, _ = submit_row(conn)
    bad, _ = submit_row(conn)
    bad_body = fal_body(bad, payload={"video": {"url": "https://x/a.mp4"}, "note": "\u0000"})

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
    assert good_answer.status_code == 200
    assert generation(conn, bad)["status"] == "submitted"
    assert generation(conn, good)["status"] == "completed"
