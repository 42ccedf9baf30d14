"""Rule 1 end to end: the ledger's submit path through the fal gateway and the simulator."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import fal_client
import psycopg
import pytest
from ledger_helpers import SEEDANCE, generation

from renderqueue_pipeline.fal_gateway import (
    FalGateway,
    FalRejected,
    FalSubmitOutcomeUnknown,
    SubmitResult,
)
from renderqueue_pipeline.ledger import LedgerEvent, record_event
from renderqueue_pipeline.ledger.core import _asubmit_generation
from renderqueue_pipeline.simulator.testing import RunningSimulator


def submit_once(
    conn: psycopg.Connection, inputs: dict, key: str | None = None, **options: object
) -> str:
    async def go() -> str:
        async with FalGateway(**options) as gateway:  # type: ignore[arg-type]

            async def submit(endpoint: str, inputs: dict) -> SubmitResult:
                return await gateway.submit(endpoint, inputs)

            return await _asubmit_generation(
                conn,
                submit,
                user_id=9,
                endpoint=SEEDANCE,
                inputs=inputs,
                idempotency_key=key,
                is_definite_rejection=lambda exc: isinstance(exc, FalRejected),
            )

    return asyncio.run(go())


def test_submit_records_the_row_fal_knows(
    fal_sim: RunningSimulator, conn: psycopg.Connection
) -> None:
    request_id = submit_once(conn, {"prompt": "a lighthouse", "duration": "5"}, key="once")
    assert fal_sim.control.ground_truth(request_id)["request_id"] == request_id
    row = generation(conn, request_id)
    assert (row["status"], row["user_id"], row["cost_micros"]) == ("submitted", 9, 5 * 303_400)
    # the same key again: no second request at fal
    assert submit_once(conn, {"prompt": "a lighthouse", "duration": "5"}, key="once") == request_id
    assert len(fal_sim.control.ground_truth()) == 1


def test_a_model_rejection_marks_the_item_rejected(
    fal_sim: RunningSimulator, conn: psycopg.Connection
) -> None:
    with pytest.raises(FalRejected):
        submit_once(conn, {"prompt": "too long a shot", "duration": "20"})
    item = conn.execute("select state, reason from batch_items").fetchone()
    assert item["state"] == "rejected"
    assert "422" in item["reason"]
    assert conn.execute("select count(*) as n from generations").fetchone()["n"] == 0


def test_a_5xx_on_submit_is_an_unknown_outcome_not_a_retry(
    fal_sim: RunningSimulator, conn: psycopg.Connection
) -> None:
    fal_sim.control.set_faults(api_500_rate=1.0)
    with pytest.raises(FalSubmitOutcomeUnknown):
        submit_once(conn, {"prompt": "a storm", "duration": "5"})
    assert len(fal_sim.control.ground_truth()) == 1  # fal queued it exactly once
    item = conn.execute("select state from batch_items").fetchone()
    assert item["state"] == "pending"  # becomes 'unknown' for the reconciler after 10 min
    assert conn.execute("select count(*) as n from generations").fetchone()["n"] == 0


def test_the_row_records_when_fal_deletes_the_outputs(
    fal_sim: RunningSimulator, conn: psycopg.Connection
) -> None:
    before = datetime.now(UTC)
    request_id = submit_once(conn, {"prompt": "a harbour", "duration": "5"}, object_lifetime=7200)
    expires = generation(conn, request_id)["fal_expires_at"]
    assert before + timedelta(seconds=7200) <= expires <= datetime.now(UTC) + timedelta(hours=2)
    assert fal_sim.control.ground_truth(request_id)["object_lifetime"] == 7200
    forever = submit_once(conn, {"prompt": "a quay", "duration": "5"}, object_lifetime=None)
    assert generation(conn, forever)["fal_expires_at"] is None


def test_the_ledger_prices_from_what_fal_documents_even_when_the_output_says_more(
    fal_sim: RunningSimulator, conn: psycopg.Connection
) -> None:
    """With the simulator's extras on, the output names its duration; fal's never does for
    Seedance, so the ledger must not read it: "auto" is priced at the 15 s default."""

    fal_sim.control.set_faults(output_extras=True)
    request_id = submit_once(conn, {"prompt": "a lantern", "duration": "auto"})
    fal_sim.control.wait_finished(request_id, timeout=30)
    output = fal_client.result(SEEDANCE, request_id)
    assert output["video"]["duration"] < 15  # the extra field is there, and tempting
    record_event(conn, LedgerEvent(request_id, "completed", output, source="api"))
    row = generation(conn, request_id)
    assert (row["status"], row["cost_basis"]) == ("completed", "requested")
    assert row["cost_micros"] == 15 * 303_400
