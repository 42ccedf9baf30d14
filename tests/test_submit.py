"""Rule 1: intent first, then fal, then the row; a crash in between is visible, not silent."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import psycopg
import pytest
from ledger_helpers import SEEDANCE, generation

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.errors import LedgerInputError
from renderqueue_pipeline.ledger import mark_unknown_outcomes
from renderqueue_pipeline.ledger.core import _submit_generation

INPUTS = {"prompt": "a red fox", "duration": "5"}


class Refused(Exception):
    """Stands for fal's definite refusal (e.g. a 422)."""


def item(conn: psycopg.Connection, key: str) -> dict | None:
    return conn.execute("select * from batch_items where idempotency_key = %s", (key,)).fetchone()


def test_the_intent_is_committed_before_fal_is_called(
    conn: psycopg.Connection, ledger_url: str
) -> None:
    """Seen from ANOTHER connection while fal is being called: committed, pending."""
    key = f"k-{uuid.uuid4().hex}"
    request_id = f"req-{uuid.uuid4().hex}"
    seen: list[dict | None] = []

    def fal_submit(endpoint: str, inputs: dict) -> str:
        with connect(ledger_url) as other:
            seen.append(item(other, key))
        return request_id

    assert (
        _submit_generation(
            conn, fal_submit, user_id=5, endpoint=SEEDANCE, inputs=INPUTS, idempotency_key=key
        )
        == request_id
    )
    assert len(seen) == 1
    assert seen[0] is not None
    assert (seen[0]["state"], seen[0]["request_id"]) == ("pending", None)
    with connect(ledger_url) as other:
        after = item(other, key)
        row = generation(other, request_id)
    assert (after["state"], after["request_id"], row["batch_item_id"]) == (
        "submitted",
        request_id,
        after["id"],
    )


def test_same_key_again_does_not_call_fal_twice(conn: psycopg.Connection) -> None:
    calls = []
    key, request_id = f"k-{uuid.uuid4().hex}", f"req-{uuid.uuid4().hex}"

    def fal_submit(endpoint: str, inputs: dict) -> str:
        calls.append(1)
        return request_id

    for _ in range(3):
        assert (
            _submit_generation(
                conn, fal_submit, user_id=5, endpoint=SEEDANCE, inputs=INPUTS, idempotency_key=key
            )
            == request_id
        )
    assert len(calls) == 1


DYING_SUBMITTER = textwrap.dedent(
    """
    import os, sys
    from renderqueue_pipeline.db.connect import connect
    from renderqueue_pipeline.ledger.core import _submit_generation

    def fal_submit(endpoint, inputs):
        # fal has the request now; the process dies before the answer is recorded
        sys.stdout.write("calling fal\\n")
        sys.stdout.flush()
        os._exit(17)

    with connect(sys.argv[1]) as conn:
        _submit_generation(conn, fal_submit, user_id=5, endpoint=sys.argv[2],
                          inputs={"prompt": "a red fox", "duration": "5"},
                          idempotency_key=sys.argv[3])
    sys.stdout.write("not reached\\n")
    """
)


def test_a_process_dying_inside_the_submit_leaves_an_unknown_outcome(
    conn: psycopg.Connection, ledger_url: str
) -> None:
    key = f"k-{uuid.uuid4().hex}"
    died = subprocess.run(
        [sys.executable, "-c", DYING_SUBMITTER, ledger_url, SEEDANCE, key],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    assert (died.returncode, died.stdout) == (17, "calling fal\n"), died.stderr
    pending = item(conn, key)  # this connection is not the dead process's
    assert (pending["state"], pending["request_id"]) == ("pending", None)
    # eleven minutes later (the ledger's clock): the dead process's lease has expired
    conn.execute(
        "select set_config('renderqueue.now', (now() + interval '11 minutes')::text, false)"
    )
    unknown = mark_unknown_outcomes(conn)
    conn.execute("select set_config('renderqueue.now', '', false)")
    assert [u["id"] for u in unknown] == [pending["id"]]
    assert item(conn, key)["state"] == "unknown"

    def must_not_be_called(endpoint: str, inputs: dict) -> str:
        raise AssertionError("an unknown outcome was submitted again")

    with pytest.raises(LedgerInputError, match="is unknown; not submitting again"):
        _submit_generation(
            conn,
            must_not_be_called,
            user_id=5,
            endpoint=SEEDANCE,
            inputs=INPUTS,
            idempotency_key=key,
        )
    rows = conn.execute(
        "select count(*) as n from generations where batch_item_id = %s", (pending["id"],)
    ).fetchone()
    assert rows["n"] == 0


def test_a_recent_pending_intent_is_not_yet_unknown(conn: psycopg.Connection) -> None:
    key = f"k-{uuid.uuid4().hex}"

    def crashing(endpoint: str, inputs: dict) -> str:
        raise ConnectionError("the answer was lost")

    with pytest.raises(ConnectionError):
        _submit_generation(
            conn, crashing, user_id=5, endpoint=SEEDANCE, inputs=INPUTS, idempotency_key=key
        )
    assert mark_unknown_outcomes(conn) == []
    assert item(conn, key)["state"] == "pending"


def test_definite_rejection_is_recorded_with_its_reason(conn: psycopg.Connection) -> None:
    key = f"k-{uuid.uuid4().hex}"

    def refusing(endpoint: str, inputs: dict) -> str:
        raise Refused("422: prompt rejected by the model")

    with pytest.raises(Refused):
        _submit_generation(
            conn,
            refusing,
            user_id=5,
            endpoint=SEEDANCE,
            inputs=INPUTS,
            idempotency_key=key,
            is_definite_rejection=lambda exc: isinstance(exc, Refused),
        )
    found = item(conn, key)
    assert (found["state"], found["reason"]) == ("rejected", "422: prompt rejected by the model")
