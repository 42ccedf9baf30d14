"""Cancelling a batch end to end: the simulator's ERROR webhooks into the real receiver.

fal's ERROR for a cancelled queued request can reach the receiver before fal's 202 reaches
us, so the cancel intent is recorded before fal is asked; a definite refusal withdraws it,
an unanswered cancel keeps it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import fal_client
import psycopg
import pytest
from batch_helpers import SEEDANCE, prompts, submit_file, write_csv

from renderqueue_pipeline.batch import BatchOptions
from renderqueue_pipeline.batch.cancel import cancel_batch
from renderqueue_pipeline.fal_gateway import FalGateway
from renderqueue_pipeline.ledger import event_from_fal_webhook, record_event
from renderqueue_pipeline.settings import load_settings
from renderqueue_pipeline.simulator.testing import FAST_TEST_OPTIONS, RunningSimulator, wait_until


def gateways(concurrency: int) -> FalGateway:
    """The gateway `renderqueue batch cancel` makes: from the environment, read now."""
    return FalGateway.from_settings(load_settings(), max_concurrency=concurrency)


OPEN = ("submitted", "in_progress")


def error_webhook(request_id: str) -> dict:
    """fal's ERROR delivery for a request that failed at fal (a model error)."""
    return {
        "request_id": request_id,
        "gateway_request_id": "gw-1",
        "status": "ERROR",
        "error": "Invalid status code: 422",
        "payload": {"detail": [{"msg": "the model refused"}]},
    }


def submit_queued(ledger_url: str, tmp_path: Path, count: int) -> int:
    path = write_csv(tmp_path / f"batch-{count}.csv", prompts(count))
    result = submit_file(
        path.as_uri(),
        BatchOptions(default_endpoint=SEEDANCE, concurrency=8),
        ledger_url=ledger_url,
    )
    assert result.stats.submitted == count, result
    return result.batch_id


def rows(conn: psycopg.Connection, batch_id: int) -> list[dict]:
    found = conn.execute(
        "select g.request_id, g.status::text as status, g.cost_micros, g.cancel_requested_at, "
        "i.cancel_outcome from batch_items i join generations g on g.request_id = i.request_id "
        "where i.batch_id = %s order by i.line_no",
        (batch_id,),
    ).fetchall()
    conn.commit()
    return found


def test_a_cancelled_batch_of_forty_queued_requests_ends_all_canceled_not_failed(
    fal_sim: RunningSimulator,
    webhook_url: str,
    ledger_url: str,
    conn: psycopg.Connection,
    tmp_path: Path,
) -> None:
    fal_sim.control.reset(seed=5, **{**FAST_TEST_OPTIONS, "queue_delay": "3600"})
    batch_id = submit_queued(ledger_url, tmp_path, 40)

    result = cancel_batch(batch_id, ledger_url=ledger_url, concurrency=16, gateway_factory=gateways)

    assert result.outcomes == Counter({"cancellation_requested": 40})
    wait_until(lambda: not any(r["status"] in OPEN for r in rows(conn, batch_id)), timeout=30)
    got = rows(conn, batch_id)
    assert Counter(r["status"] for r in got) == Counter({"canceled": 40})
    assert all(r["cost_micros"] == 0 and r["cancel_requested_at"] for r in got)
    # fal cancelled every one and its ERROR webhook reached the receiver
    truths = {t["request_id"]: t for t in fal_sim.control.ground_truth()}
    assert all(truths[r["request_id"]]["status"] == "canceled" for r in got)
    delivered = {
        a["request_id"] for a in fal_sim.control.webhook_attempts() if a["outcome"] == "delivered"
    }
    assert delivered >= {r["request_id"] for r in got}


@pytest.mark.parametrize("fault", ["500", "unreachable"])
def test_a_cancel_fal_never_answered_keeps_the_intent_and_says_so(
    fal_sim: RunningSimulator,
    webhook_url: str,
    ledger_url: str,
    conn: psycopg.Connection,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    """fal may have received it: the intent stays, so fal's ERROR maps to `canceled`."""

    monkeypatch.setattr(fal_client.client, "MAX_ATTEMPTS", 1)  # fal-client's own retries
    fal_sim.control.reset(
        seed=5, **{**FAST_TEST_OPTIONS, "queue_delay": "3600", "cancel_fault": fault}
    )
    batch_id = submit_queued(ledger_url, tmp_path, 2)

    result = cancel_batch(batch_id, ledger_url=ledger_url, concurrency=2, gateway_factory=gateways)

    assert result.outcomes == Counter({"error": 2})
    got = rows(conn, batch_id)
    assert all(r["status"] == "submitted" and r["cancel_requested_at"] for r in got)
    assert all(r["cancel_outcome"].startswith("error: ") for r in got)
    assert not any(t["cancel_requested"] for t in fal_sim.control.ground_truth())


def test_a_cancel_fal_refused_withdraws_the_intent_so_a_failure_stays_failed(
    fal_sim: RunningSimulator,
    webhook_url: str,
    ledger_url: str,
    conn: psycopg.Connection,
    tmp_path: Path,
) -> None:
    """fal answers "already completed": the row's later ERROR is a failure, not our cancel."""
    fal_sim.control.reset(
        seed=5, **{**FAST_TEST_OPTIONS, "failure_rate": 1.0, "webhook_drop_rate": 1.0}
    )
    batch_id = submit_queued(ledger_url, tmp_path, 1)
    [row] = rows(conn, batch_id)
    fal_sim.control.wait_finished(row["request_id"])  # failed at fal; its webhook lost

    result = cancel_batch(batch_id, ledger_url=ledger_url, gateway_factory=gateways)

    assert result.outcomes == Counter({"already_completed": 1})
    [row] = rows(conn, batch_id)
    assert (row["status"], row["cancel_requested_at"]) == ("submitted", None)
    body = error_webhook(row["request_id"])
    assert record_event(conn, event_from_fal_webhook(body)) == "applied"
    assert rows(conn, batch_id)[0]["status"] == "failed"
