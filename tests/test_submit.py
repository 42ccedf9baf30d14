"""Rule 1: intent first, then fal, then the row; a crash in between is visible, not silent."""

from __future__ import annotations

import psycopg
import pytest
from ledger_helpers import SEEDANCE, generation

from renderqueue_pipeline.errors import LedgerInputError
from renderqueue_pipeline.ledger import mark_unknown_outcomes, submit_generation

INPUTS = {"prompt": "a red fox", "duration": "5"}


class Crash(Exception):
    """Stands for the process dying after fal accepted the request."""


class Refused(Exception):
    """Stands for fal's definite refusal (e.g. a 422)."""


def test_submit_writes_intent_then_row(conn: psycopg.Connection) -> None:
    calls: list[str] = []

    def fal_submit(endpoint: str, inputs: dict) -> str:
        item = conn.execute("select state from batch_items").fetchone()
        calls.append(item["state"])  # the intent is already recorded when fal is called
        return "req-1"

    request_id = submit_generation(
        conn, fal_submit, user_id=5, endpoint=SEEDANCE, inputs=INPUTS, idempotency_key="k1"
    )
    assert request_id == "req-1" and calls == ["pending"]
    row = generation(conn, "req-1")
    item = conn.execute("select * from batch_items").fetchone()
    assert (item["state"], item["request_id"], row["batch_item_id"]) == (
        "submitted",
        "req-1",
        item["id"],
    )


def test_same_key_again_does_not_call_fal_twice(conn: psycopg.Connection) -> None:
    calls = []

    def fal_submit(endpoint: str, inputs: dict) -> str:
        calls.append(1)
        return "req-1"

    for _ in range(3):
        assert (
            submit_generation(
                conn, fal_submit, user_id=5, endpoint=SEEDANCE, inputs=INPUTS, idempotency_key="k"
            )
            == "req-1"
        )
    assert len(calls) == 1


def test_crash_after_fal_leaves_an_unknown_outcome_not_a_resubmission(
    conn: psycopg.Connection,
) -> None:
    def crashing(endpoint: str, inputs: dict) -> str:
        raise Crash

    with pytest.raises(Crash):
        submit_generation(
            conn, crashing, user_id=5, endpoint=SEEDANCE, inputs=INPUTS, idempotency_key="k2"
        )
    conn.execute("update batch_items set created_at = now() - interval '11 minutes'")
    unknown = mark_unknown_outcomes(conn)
    assert len(unknown) == 1 and unknown[0]["user_id"] == 5
    with pytest.raises(LedgerInputError, match="is unknown; not submitting again"):
        submit_generation(
            conn, crashing, user_id=5, endpoint=SEEDANCE, inputs=INPUTS, idempotency_key="k2"
        )
    assert conn.execute("select count(*) as n from generations").fetchone()["n"] == 0


def test_definite_rejection_is_recorded_with_its_reason(conn: psycopg.Connection) -> None:
    def refusing(endpoint: str, inputs: dict) -> str:
        raise Refused("422: prompt rejected by the model")

    with pytest.raises(Refused):
        submit_generation(
            conn,
            refusing,
            user_id=5,
            endpoint=SEEDANCE,
            inputs=INPUTS,
            is_definite_rejection=lambda exc: isinstance(exc, Refused),
        )
    item = conn.execute("select state, reason from batch_items").fetchone()
    assert item == {"state": "rejected", "reason": "422: prompt rejected by the model"}
