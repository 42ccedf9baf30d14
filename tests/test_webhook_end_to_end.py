"""The simulator's signed webhooks, every fault knob on, into the real receiver and ledger.

The ledger must end identical to the simulator's ground truth: same status, same output,
and the cost priced from the requested seconds (fal's output documents no duration; "auto"
is the 15 s default) x list price, nothing for failures.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fal_client
import httpx
import psycopg
import pytest
from ledger_helpers import SEEDANCE
from webhook_helpers import serving

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.db.server import embedded_url, stop_embedded
from renderqueue_pipeline.ledger.core import _submit_generation
from renderqueue_pipeline.simulator.testing import FAST_TEST_OPTIONS, RunningSimulator, wait_until
from renderqueue_pipeline.webhook.app import ReceiverConfig, create_app

pytestmark = pytest.mark.e2e  # whole-product runs: `make test`, not `make test-fast`

PRICE_720P = 303_400  # micro-dollars per second, Seedance 2.0 at 720p

EVERY_FAULT = {
    **FAST_TEST_OPTIONS,
    "failure_rate": 0.2,
    "payload_error_rate": 0.1,
    "webhook_duplicate_rate": 0.4,
    "webhook_drop_rate": 0.1,
    "webhook_out_of_order_rate": 0.3,
    "webhook_early_rate": 0.3,
    "webhook_delay": "0:0.1",
}


def fal_submitter(webhook_url: str) -> Callable[[str, dict], str]:

    return lambda endpoint, inputs: (
        fal_client.submit(endpoint, arguments=inputs, webhook_url=webhook_url).request_id
    )


def settled(sim: RunningSimulator, request_ids: list[str]) -> bool:
    """Every request finished and every copy of its webhook delivered (or dropped)."""
    truths = {t["request_id"]: t for t in sim.control.ground_truth()}
    attempts = sim.control.webhook_attempts()
    for request_id in request_ids:
        truth = truths[request_id]
        if truth["status"] not in ("completed", "failed", "canceled"):
            return False
        if truth["decisions"]["drop"]:
            continue
        copies = 1 + int(truth["decisions"]["duplicate"])
        delivered = {
            a["copy"]
            for a in attempts
            if a["request_id"] == request_id and a["outcome"] == "delivered"
        }
        if len(delivered) < copies:
            return False
    return True


def _without_signature(url: str) -> str:
    """The CDN path (the simulator signs a fresh query string each time it is asked)."""
    return urlsplit(url)._replace(query="").geturl()


def expected_row(truth: dict[str, Any], requested_seconds: int) -> dict[str, Any]:
    """What the ledger must say, from the simulator's own decisions and the request."""
    if truth["decisions"]["drop"]:
        return {"status": "submitted"}  # no webhook ever came: the reconciler's job
    if truth["status"] == "completed" and truth["decisions"]["payload_error"]:
        return {"status": "completed", "outputs": None, "cost_basis": "estimate"}
    if truth["status"] != "completed":
        return {"status": truth["status"], "cost_micros": 0}
    return {
        "status": "completed",
        "cost_basis": "requested",
        "cost_micros": requested_seconds * PRICE_720P,
        "video_url": _without_signature(truth["output"]["video"]["url"]),
    }


def actual_row(row: dict[str, Any], keys: dict[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in keys if k != "video_url"}
    if "video_url" in keys:  # `outputs` is fal's payload as sent: {"video": {"url": ...}}
        video = (row["outputs"] or {}).get("video") or {}
        out["video_url"] = _without_signature(video.get("url", ""))
    return out


def test_every_fault_knob_leaves_the_ledger_equal_to_ground_truth(
    fal_sim: RunningSimulator, ledger_url: str, conn: psycopg.Connection
) -> None:
    fal_sim.control.reset(seed=11, **EVERY_FAULT)
    app = create_app(ReceiverConfig(ledger_url, fal_sim.jwks_url))
    with serving(app) as url:
        submit = fal_submitter(f"{url}/webhooks/fal")
        request_ids = [
            _submit_generation(
                conn,
                submit,
                user_id=i % 4,
                endpoint=SEEDANCE,
                inputs={"prompt": f"shot {i}", "duration": "auto" if i % 3 else "5"},
            )
            for i in range(40)
        ]
        wait_until(lambda: settled(fal_sim, request_ids), timeout=60, interval=0.1)
    truths = {t["request_id"]: t for t in fal_sim.control.ground_truth()}
    decisions = [truths[r]["decisions"] for r in request_ids]
    # the knobs really fired in this run
    for knob in ("drop", "duplicate", "early", "out_of_order", "fail", "payload_error"):
        assert any(d[knob] for d in decisions), f"no request had {knob}"
    # early deliveries reached the receiver before the submit response: stored, answered 202
    attempts = fal_sim.control.webhook_attempts()
    early = [r for r, d in zip(request_ids, decisions, strict=True) if d["early"] and not d["drop"]]
    assert early
    assert all(
        any(a["status_code"] == 202 for a in attempts if a["request_id"] == r) for r in early
    )
    for request_id in request_ids:
        row = conn.execute(
            "select * from generations where request_id = %s", (request_id,)
        ).fetchone()
        seconds = 15 if row["inputs"]["duration"] == "auto" else int(row["inputs"]["duration"])
        expected = expected_row(truths[request_id], seconds)
        assert actual_row(row, expected) == expected, request_id
    waiting = conn.execute("select count(*) as n from generation_events where applied_at is null")
    assert waiting.fetchone()["n"] == 0
    duplicates = conn.execute(
        "select count(*) as n from generation_events group by request_id having count(*) > 1"
    ).fetchall()
    assert duplicates == []  # every duplicate delivery was recognised, none stored twice


def test_postgres_down_mid_run_then_back_lands_every_event_once(
    fal_sim: RunningSimulator, tmp_path: Path
) -> None:
    """While Postgres is down the receiver answers 503; fal's retries land after restart."""
    home = tmp_path / "outage"
    url = embedded_url(home)
    migrate(url)
    fal_sim.control.reset(
        seed=5,
        **{
            **FAST_TEST_OPTIONS,
            "run_time": "1.0:1.5",
            "webhook_retry_base": 0.3,
            "webhook_retry_max": 1.0,
            "webhook_max_attempts": 20,
        },
    )
    try:
        with serving(create_app(ReceiverConfig(url, fal_sim.jwks_url))) as receiver:
            submit = fal_submitter(f"{receiver}/webhooks/fal")
            with connect(url) as ledger:
                request_ids = [
                    _submit_generation(
                        ledger,
                        submit,
                        user_id=1,
                        endpoint=SEEDANCE,
                        inputs={"prompt": f"p{i}", "duration": "5"},
                    )
                    for i in range(10)
                ]
            assert stop_embedded(home)
            wait_until(
                lambda: any(a["status_code"] == 503 for a in fal_sim.control.webhook_attempts()),
                timeout=60,
            )
            assert httpx.get(f"{receiver}/healthz").status_code == 503
            embedded_url(home)  # Postgres is back
            wait_until(lambda: settled(fal_sim, request_ids), timeout=60, interval=0.1)
        with connect(url) as ledger:
            rows = ledger.execute(
                "select g.status, count(e.id) as events from generations g "
                "join generation_events e using (request_id) group by g.request_id, g.status"
            ).fetchall()
        assert len(rows) == 10
        assert all(r == {"status": "completed", "events": 1} for r in rows)
        refused = [a for a in fal_sim.control.webhook_attempts() if a["status_code"] == 503]
        assert refused, "no delivery met the outage"
    finally:
        stop_embedded(home)
