"""Cancellation as fal does it: a signal, confirmed by the outcome, never by a guessed string."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from ledger_helpers import generation, submit_row, video_payload

from renderqueue_pipeline.ledger import (
    LedgerEvent,
    event_from_fal_webhook,
    mark_cancel_requested,
    record_event,
    record_events,
)

REPO = Path(__file__).resolve().parent.parent
PRICE_720P = 303_400  # published Seedance 2.0 720p price, micro-dollars a second


def error_webhook(request_id: str, payload: dict | None = None) -> dict:
    return {
        "request_id": request_id,
        "gateway_request_id": "gw-1",
        "status": "ERROR",
        "error": "Request failed",
        "payload": payload or {"detail": "the app stopped"},
    }


def test_an_error_after_fal_accepted_our_cancel_is_the_cancellation(
    conn: psycopg.Connection,
) -> None:
    request_id, _ = submit_row(conn)
    assert mark_cancel_requested(conn, request_id) is True
    assert generation(conn, request_id)["cancel_requested_at"] is not None
    assert record_event(conn, event_from_fal_webhook(error_webhook(request_id))) == "applied"
    row = generation(conn, request_id)
    assert (row["status"], row["cost_micros"], row["cost_basis"]) == ("canceled", 0, "none")


@pytest.mark.parametrize("error_type", ["request_cancelled", "client_cancelled"])
def test_no_error_string_cancels_a_request_we_did_not_cancel(
    conn: psycopg.Connection, error_type: str
) -> None:
    request_id, _ = submit_row(conn)
    body = error_webhook(request_id, {"detail": "cancelled", "error_type": error_type})
    record_event(conn, event_from_fal_webhook(body))
    assert generation(conn, request_id)["status"] == "failed"


def test_no_code_matches_a_guessed_cancel_string() -> None:
    for folder in ("sql", "renderqueue_pipeline/ledger", "renderqueue_pipeline/webhook"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".sql"):
                assert "request_cancelled" not in path.read_text(), path


@pytest.mark.parametrize("cancel_first", [True, False])
def test_a_canceled_request_fal_completed_anyway_is_completed_and_billed(
    conn: psycopg.Connection, cancel_first: bool
) -> None:
    """Either order ends the same: completed, billed at the requested seconds, no conflict."""
    request_id, _ = submit_row(conn)  # 5 s at 720p
    mark_cancel_requested(conn, request_id)
    cancel = event_from_fal_webhook(error_webhook(request_id))
    done = LedgerEvent(request_id, "completed", video_payload())
    outcomes = record_events(conn, [cancel, done] if cancel_first else [done, cancel])
    assert outcomes == (["applied", "applied"] if cancel_first else ["applied", "stale"])
    row = generation(conn, request_id)
    assert (row["status"], row["conflict"], row["error"]) == ("completed", False, None)
    assert (row["cost_micros"], row["cost_basis"], row["billed_seconds"]) == (
        5 * PRICE_720P,
        "requested",
        Decimal(5),
    )


def test_a_payload_less_completion_of_a_canceled_row_restores_the_estimate(
    conn: psycopg.Connection,
) -> None:
    request_id, _ = submit_row(conn)
    mark_cancel_requested(conn, request_id)
    record_event(conn, event_from_fal_webhook(error_webhook(request_id)))
    body = {"request_id": request_id, "status": "OK", "payload": None, "payload_error": "x"}
    record_event(conn, event_from_fal_webhook(body))
    row = generation(conn, request_id)
    assert (row["status"], row["cost_micros"], row["cost_basis"]) == (
        "completed",
        5 * PRICE_720P,
        "estimate",
    )


def test_cancel_of_an_unknown_request_is_false_and_the_first_time_is_kept(
    conn: psycopg.Connection,
) -> None:
    assert mark_cancel_requested(conn, "never-submitted") is False
    request_id, _ = submit_row(conn)
    mark_cancel_requested(conn, request_id)
    first = generation(conn, request_id)["cancel_requested_at"]
    mark_cancel_requested(conn, request_id)
    assert generation(conn, request_id)["cancel_requested_at"] == first


def test_raw_sql_may_complete_a_canceled_row_but_not_fail_a_completed_one(
    conn: psycopg.Connection,
) -> None:
    request_id, _ = submit_row(conn)
    conn.execute("update generations set status = 'canceled' where request_id = %s", (request_id,))
    conn.execute(
        "update generations set status = 'completed', cost_micros = 7 where request_id = %s",
        (request_id,),
    )
    assert generation(conn, request_id)["status"] == "completed"
    with pytest.raises(psycopg.errors.CheckViolation, match="is completed and cannot become"):
        conn.execute(
            "update generations set status = 'canceled' where request_id = %s", (request_id,)
        )
    conn.rollback()
