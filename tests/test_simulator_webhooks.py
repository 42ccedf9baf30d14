"""Webhooks: fal's signature scheme verified independently, and every delivery fault knob."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import ssl
import threading
import time
from typing import Any

import fal_client
import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from renderqueue_pipeline.simulator.config import SimConfig
from renderqueue_pipeline.simulator.engine import retry_schedule
from renderqueue_pipeline.simulator.testing import (
    RunningSimulator,
    WebhookSink,
    wait_until,
)

ENDPOINT = "bytedance/seedance-2.0/text-to-video"
INPUTS = {"prompt": "a lighthouse in fog", "duration": "6", "resolution": "480p"}

pytestmark = [pytest.mark.timeout(60), pytest.mark.e2e]  # the simulator delivers to a live receiver


# ----- an independent implementation of fal's webhook verification ---------------------------


def fetch_public_keys(jwks_url: str, ca_bundle: str) -> list[Ed25519PublicKey]:
    """Fetch the JWKS like a receiver would (over TLS) and load every Ed25519 key."""
    document = (
        httpx.get(jwks_url, verify=ssl.create_default_context(cafile=ca_bundle))
        .raise_for_status()
        .json()
    )
    keys = []
    for jwk in document["keys"]:
        if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
            raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
    return keys


def verify_fal_webhook(
    keys: list[Ed25519PublicKey],
    headers: dict[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance: int = 300,
) -> bool:
    """fal's scheme: Ed25519 over id\\nuser\\ntimestamp\\nsha256_hex(raw body), ±300 s window."""
    try:
        request_id = headers["x-fal-webhook-request-id"]
        user_id = headers["x-fal-webhook-user-id"]
        timestamp = headers["x-fal-webhook-timestamp"]
        signature = bytes.fromhex(headers["x-fal-webhook-signature"])
    except (KeyError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance:
        return False
    message = "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()])
    for key in keys:
        try:
            key.verify(signature, message.encode("utf-8"))
            return True
        except InvalidSignature:
            continue
    return False


def submit(sink: WebhookSink, inputs: dict[str, Any] | None = None) -> fal_client.SyncRequestHandle:
    return fal_client.submit(ENDPOINT, arguments=inputs or INPUTS, webhook_url=sink.url)


# ----- tests -----------------------------------------------------------------------------------


def test_webhook_body_headers_and_signature(fal_sim: RunningSimulator, webhook_sink: WebhookSink):
    handle = submit(webhook_sink)
    (hook,) = wait_until(lambda: webhook_sink.for_request(handle.request_id))
    keys = fetch_public_keys(fal_sim.env["FAL_JWKS_URL"], str(fal_sim.ca_bundle))
    assert verify_fal_webhook(keys, hook.headers, hook.body)

    body = hook.json()
    assert hook.body == json.dumps(body, sort_keys=True).encode()
    assert body["request_id"] == handle.request_id
    assert body["status"] == "OK"
    assert body["error"] is None
    assert set(body["payload"]) == {"video", "seed"}  # fal's documented output, nothing more
    assert body["payload"]["video"]["content_type"] == "video/mp4"
    assert body["payload"]["video"]["url"] == handle.get()["video"]["url"]  # one stable URL
    assert hook.headers["x-fal-webhook-user-id"] == "sim-user"
    assert hook.headers["content-type"] == "application/json"
    truth = fal_sim.control.ground_truth(handle.request_id)
    assert body["gateway_request_id"] == truth["gateway_request_id"]
    assert body["payload"]["video"]["file_size"] == truth["output"]["video"]["file_size"]


def test_tampered_or_stale_webhooks_are_rejected(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    handle = submit(webhook_sink)
    (hook,) = wait_until(lambda: webhook_sink.for_request(handle.request_id))
    keys = fetch_public_keys(fal_sim.jwks_url, str(fal_sim.ca_bundle))
    tampered = hook.body.replace(b'"status": "OK"', b'"status": "ERROR"')
    assert tampered != hook.body
    assert not verify_fal_webhook(keys, hook.headers, tampered)
    reserialised = json.dumps(hook.json(), separators=(",", ":")).encode()  # same JSON
    assert not verify_fal_webhook(keys, hook.headers, reserialised)
    other_id = {**hook.headers, "x-fal-webhook-request-id": "someone-else"}
    assert not verify_fal_webhook(keys, other_id, hook.body)
    sent = int(hook.headers["x-fal-webhook-timestamp"])
    assert verify_fal_webhook(keys, hook.headers, hook.body, now=sent + 299)
    assert not verify_fal_webhook(keys, hook.headers, hook.body, now=sent + 301)
    assert not verify_fal_webhook(keys, hook.headers, hook.body, now=sent - 301)


def test_clock_skew_knob_moves_the_signed_timestamp(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    fal_sim.control.set_faults(webhook_clock_skew=-600)
    handle = submit(webhook_sink)
    (hook,) = wait_until(lambda: webhook_sink.for_request(handle.request_id))
    keys = fetch_public_keys(fal_sim.jwks_url, str(fal_sim.ca_bundle))
    assert not verify_fal_webhook(keys, hook.headers, hook.body)  # outside the window
    assert verify_fal_webhook(keys, hook.headers, hook.body, now=time.time() - 600)


def test_failed_request_webhook_carries_422_payload(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    fal_sim.control.set_faults(failure_rate=1.0)
    handle = submit(webhook_sink)
    (hook,) = wait_until(lambda: webhook_sink.for_request(handle.request_id))
    body = hook.json()
    assert body["status"] == "ERROR"
    assert body["error"] == "Invalid status code: 422"
    assert body["payload"]["detail"][0]["type"] == "content_policy_violation"


def test_payload_error_webhook(fal_sim: RunningSimulator, webhook_sink: WebhookSink) -> None:
    fal_sim.control.set_faults(payload_error_rate=1.0)
    handle = submit(webhook_sink)
    (hook,) = wait_until(lambda: webhook_sink.for_request(handle.request_id))
    body = hook.json()
    assert body["status"] == "OK"
    assert body["payload"] is None
    assert body["payload_error"]
    assert handle.get()["video"]  # the result endpoint still has the output


def test_canceled_request_webhook(fal_sim: RunningSimulator, webhook_sink: WebhookSink) -> None:
    """A queued request left the queue: an ERROR webhook with fal's client_cancelled (499)."""
    fal_sim.control.set_faults(queue_delay="5")
    handle = submit(webhook_sink)
    handle.cancel()
    (hook,) = wait_until(lambda: webhook_sink.for_request(handle.request_id))
    body = hook.json()
    assert body["status"] == "ERROR"
    assert body["error"] == "Invalid status code: 499"
    assert body["payload"]["error_type"] == "client_cancelled"
    assert b"request_cancelled" not in hook.body  # no invented error strings


def test_cancel_while_running_still_delivers_the_output(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    fal_sim.control.set_faults(queue_delay="0", run_time="3")
    handle = submit(webhook_sink)
    wait_until(lambda: isinstance(handle.status(), fal_client.InProgress), timeout=30)
    handle.cancel()
    (hook,) = wait_until(lambda: webhook_sink.for_request(handle.request_id), timeout=30)
    assert hook.json()["status"] == "OK"
    assert hook.json()["payload"]["video"]["url"]


def test_failed_deliveries_are_retried_with_backoff(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    fal_sim.control.set_faults(webhook_retry_base=0.05, webhook_retry_max=1.0)
    webhook_sink.answer_next(500, 503, 502)
    handle = submit(webhook_sink)
    wait_until(lambda: webhook_sink.accepted(), timeout=30)
    hooks = webhook_sink.for_request(handle.request_id)
    assert [h.answered for h in hooks] == [500, 503, 502, 200]
    gaps = [b.arrived_mono - a.arrived_mono for a, b in itertools.pairwise(hooks)]
    assert gaps[0] >= 0.05
    assert gaps[1] >= 0.1
    assert gaps[2] >= 0.2  # doubling backoff
    assert len({h.body for h in hooks}) == 1  # the body is fixed once: same bytes every time
    # the simulator records an attempt after the sink answered it: wait for the fourth
    attempts = wait_until(
        lambda: (found := fal_sim.control.webhook_attempts(handle.request_id))[3:] and found,
        timeout=30,
    )
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [
        (1, "failed"),
        (2, "failed"),
        (3, "failed"),
        (4, "delivered"),
    ]


#: a local delivery's latency, generous for a loaded 2-core machine
DELIVERY_LATENCY = 2.0


def test_each_retry_is_signed_afresh_with_its_own_timestamp(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    fal_sim.control.set_faults(webhook_retry_base=1.2, webhook_retry_max=5)  # stamp moves
    webhook_sink.answer_next(500)
    handle = submit(webhook_sink)
    first, second = wait_until(
        lambda: h if len(h := webhook_sink.for_request(handle.request_id)) == 2 else None,
        timeout=30,
    )
    keys = fetch_public_keys(fal_sim.jwks_url, str(fal_sim.ca_bundle))
    stamps = []
    for hook in (first, second):
        stamp = int(hook.headers["x-fal-webhook-timestamp"])
        # whole seconds when signed: up to 1 s behind the moment of signing, plus the
        # delivery's latency, and never ahead of the arrival
        lag = hook.arrived_wall - stamp
        assert 0 <= lag < 1 + DELIVERY_LATENCY, (stamp, hook.arrived_wall)
        assert verify_fal_webhook(keys, hook.headers, hook.body)
        stamps.append(stamp)
    # the retry waits 1.2 s: signed afresh, its whole second is a later one
    assert stamps[1] > stamps[0]
    assert second.headers["x-fal-webhook-signature"] != first.headers["x-fal-webhook-signature"]


def test_keep_timestamp_knob_resends_the_first_signature(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    fal_sim.control.set_faults(
        webhook_retry_base=1.2, webhook_retry_max=5, webhook_keep_timestamp=True
    )
    webhook_sink.answer_next(503)
    handle = submit(webhook_sink)
    first, second = wait_until(
        lambda: h if len(h := webhook_sink.for_request(handle.request_id)) == 2 else None,
        timeout=30,
    )
    for header in ("x-fal-webhook-timestamp", "x-fal-webhook-signature"):
        assert first.headers[header] == second.headers[header]
    assert second.arrived_wall - int(second.headers["x-fal-webhook-timestamp"]) >= 1


def test_4xx_answers_are_final_by_default(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    """Whether fal retries a 4xx is not documented: by default it does not."""
    webhook_sink.answer_next(400)
    handle = submit(webhook_sink)
    (attempt,) = wait_until(lambda: fal_sim.control.webhook_attempts(handle.request_id))
    assert (attempt["status_code"], attempt["will_retry"]) == (400, False)
    fal_sim.control.set_faults(webhook_retry_on="4xx+5xx")
    webhook_sink.answer_next(409)
    handle = submit(webhook_sink)
    hooks = wait_until(
        lambda: h if len(h := webhook_sink.for_request(handle.request_id)) == 2 else None,
        timeout=30,
    )
    assert [h.answered for h in hooks] == [409, 200]


def test_default_delivery_retries_ten_times_over_about_two_hours() -> None:
    """fal: "retried 10 times in the span of 2 hours"; the defaults spread them so."""

    delays = retry_schedule(SimConfig())
    assert len(delays) == 10
    assert 1.75 * 3600 <= sum(delays) <= 2.25 * 3600
    assert delays == sorted(delays)


def test_delivery_gives_up_after_max_attempts(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    fal_sim.control.set_faults(webhook_max_attempts=3, webhook_retry_base=0.01)
    webhook_sink.default_status = 500
    handle = submit(webhook_sink)
    attempts = wait_until(
        lambda: a if len(a := fal_sim.control.webhook_attempts(handle.request_id)) == 3 else None,
        timeout=30,
    )
    assert [a["will_retry"] for a in attempts] == [True, True, False]  # the last one says so
    assert len(webhook_sink.for_request(handle.request_id)) == 3


def test_unreachable_receiver_is_recorded_as_failed_attempts(fal_sim: RunningSimulator) -> None:
    fal_sim.control.set_faults(webhook_max_attempts=2, webhook_retry_base=0.01)
    handle = fal_client.submit(ENDPOINT, arguments=INPUTS, webhook_url="http://127.0.0.1:9/hook")
    attempts = wait_until(
        lambda: a if len(a := fal_sim.control.webhook_attempts(handle.request_id)) == 2 else None,
        timeout=30,
    )
    assert all(a["outcome"] == "failed" and a["error"] for a in attempts)


def test_duplicates_arrive(fal_sim: RunningSimulator, webhook_sink: WebhookSink) -> None:
    fal_sim.control.set_faults(webhook_duplicate_rate=1.0)
    handle = submit(webhook_sink)
    hooks = wait_until(
        lambda: h if len(h := webhook_sink.for_request(handle.request_id)) == 2 else None
    )
    assert hooks[0].body == hooks[1].body
    attempts = wait_until(
        lambda: a if len(a := fal_sim.control.webhook_attempts(handle.request_id)) == 2 else None
    )
    assert sorted(a["copy"] for a in attempts) == [0, 1]


def test_dropped_webhooks_never_arrive(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    fal_sim.control.set_faults(webhook_drop_rate=1.0)
    handle = submit(webhook_sink)
    fal_sim.control.wait_finished(handle.request_id)
    time.sleep(0.3)
    assert webhook_sink.for_request(handle.request_id) == []
    (attempt,) = fal_sim.control.webhook_attempts(handle.request_id)
    assert attempt["outcome"] == "dropped"
    assert handle.get()["video"]  # polling still finds the result: the reconciler's job


def test_early_delivery_precedes_the_submit_response(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    fal_sim.control.set_faults(webhook_early_rate=1.0, submit_latency="0.05")
    handle = submit(webhook_sink)
    returned = time.monotonic()
    hooks = webhook_sink.for_request(handle.request_id)
    assert len(hooks) == 1  # already there when submit() returned
    assert hooks[0].arrived_mono < returned
    assert hooks[0].json()["status"] == "OK"


def test_delayed_delivery(fal_sim: RunningSimulator, webhook_sink: WebhookSink) -> None:
    fal_sim.control.set_faults(webhook_delay="0.5")
    handle = submit(webhook_sink)
    truth = fal_sim.control.wait_finished(handle.request_id)
    (hook,) = wait_until(lambda: webhook_sink.for_request(handle.request_id))
    assert hook.arrived_wall - truth["finished_at"] >= 0.45


def _delivery_order(sim: RunningSimulator, sink: WebhookSink, n: int) -> tuple[list[int], list]:
    """Submit n requests one after another; return (arrival order by index, decisions)."""
    handles = [submit(sink) for _ in range(n)]
    index = {h.request_id: i for i, h in enumerate(handles)}
    wait_until(lambda: len(sink.received) >= n, timeout=20)
    order = [index[h.request_id] for h in sink.received if h.request_id in index]
    truths = sim.control.ground_truth()
    return order, [t["decisions"]["out_of_order"] for t in truths]


def test_out_of_order_delivery_reproducible_under_seed(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    # identical timings: only the knob can push a request's webhook behind later ones
    # held back far longer than submitting all five can take, even on a loaded machine
    options = {"queue_delay": "0", "run_time": "0.05", "webhook_out_of_order_delay": "3:3.5"}
    runs = []
    for _ in range(2):
        webhook_sink.received.clear()
        fal_sim.control.reset(seed=11, webhook_out_of_order_rate=0.5, **options)
        runs.append(_delivery_order(fal_sim, webhook_sink, 5))
    (order_a, held_a), (order_b, held_b) = runs
    assert held_a == held_b
    assert any(held_a)
    assert not all(held_a)  # same seed, same decisions
    held_back = {i for i, held in enumerate(held_a) if held}
    for order in (order_a, order_b):
        assert order != sorted(order)  # held-back webhooks were overtaken...
        assert set(order[-len(held_back) :]) == held_back  # ...by every one not held back


def test_fault_decisions_are_reproducible_under_one_seed(fal_sim: RunningSimulator) -> None:
    knobs = {
        "failure_rate": 0.3,
        "webhook_duplicate_rate": 0.3,
        "webhook_drop_rate": 0.3,
        "webhook_early_rate": 0.2,
        "queue_delay": "0.01:0.05",
        "run_time": "0.01:0.05",
    }

    def story(seed: int) -> list[dict[str, Any]]:
        fal_sim.control.reset(seed=seed, **knobs)
        handles = [fal_client.submit(ENDPOINT, arguments=INPUTS) for _ in range(12)]
        for handle in handles:
            fal_sim.control.wait_finished(handle.request_id)
        return [
            {
                "status": t["status"],
                "billed": t["billed_seconds"],
                "duration": t["output_duration"],
                **t["decisions"],
            }
            for t in fal_sim.control.ground_truth()
        ]

    first, second, other = story(5), story(5), story(6)
    assert first == second
    assert first != other
    statuses = {s["status"] for s in first}
    assert statuses == {"completed", "failed"}
    assert any(s["duplicate"] for s in first)
    assert any(s["drop"] for s in first)


def test_concurrent_submissions_with_webhooks(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    """Many threads at once: every request gets exactly one webhook and a ground-truth row."""
    handles: list[fal_client.SyncRequestHandle] = []
    lock = threading.Lock()

    def worker() -> None:
        handle = submit(webhook_sink)
        with lock:
            handles.append(handle)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_until(lambda: len(webhook_sink.received) == 16, timeout=20)
    assert {h.request_id for h in webhook_sink.received} == {h.request_id for h in handles}
    assert len(fal_sim.control.ground_truth()) == 16


# ----- the JWKS: two keys, one with a padded x, rotated through the control API -----------------


def test_jwks_serves_two_keys_one_with_a_padded_x(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    document = httpx.get(
        fal_sim.jwks_url, verify=ssl.create_default_context(cafile=fal_sim.ca_bundle)
    ).json()
    xs = [key["x"] for key in document["keys"]]
    assert len(xs) == 2
    assert len(set(xs)) == 2
    assert sum(x.endswith("=") for x in xs) == 1  # one padded, one not: read both
    handle = submit(webhook_sink)
    (hook,) = wait_until(lambda: webhook_sink.for_request(handle.request_id))
    keys = fetch_public_keys(fal_sim.jwks_url, str(fal_sim.ca_bundle))
    assert verify_fal_webhook(keys, hook.headers, hook.body)


def test_rotating_keys_signs_with_a_new_key_and_keeps_the_old_one_published(
    fal_sim: RunningSimulator, webhook_sink: WebhookSink
) -> None:
    before = fetch_public_keys(fal_sim.jwks_url, str(fal_sim.ca_bundle))
    old = submit(webhook_sink)
    (old_hook,) = wait_until(lambda: webhook_sink.for_request(old.request_id))
    rotated = httpx.post(
        f"{fal_sim.base_url}/_sim/jwks/rotate",
        verify=ssl.create_default_context(cafile=fal_sim.ca_bundle),
    )
    assert rotated.status_code == 200
    assert len(rotated.json()["keys"]) == 2
    new = submit(webhook_sink)
    (new_hook,) = wait_until(lambda: webhook_sink.for_request(new.request_id))
    after = fetch_public_keys(fal_sim.jwks_url, str(fal_sim.ca_bundle))
    assert not verify_fal_webhook(before, new_hook.headers, new_hook.body)  # a stale cache fails
    assert verify_fal_webhook(after, new_hook.headers, new_hook.body)
    assert verify_fal_webhook(after, old_hook.headers, old_hook.body)  # the old key stays
