"""The reconciler against the simulator (real fal-client over TLS) and the real ledger.

What fal says decides: lost webhooks and payload-less completions end at the simulator's
ground truth; a request fal does not know, or one open past the limit, becomes failed
with cost zero; a re-queue is not terminal; young rows are left alone.
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from urllib.parse import urlsplit

import fal_client
import psycopg
import pytest
from click.testing import CliRunner
from ledger_helpers import SEEDANCE, fal_from_env, submit_row
from webhook_helpers import serving

from renderqueue_pipeline.cli import main
from renderqueue_pipeline.fal_gateway import FalGateway
from renderqueue_pipeline.ledger import LedgerEvent, mark_cancel_requested, record_events
from renderqueue_pipeline.ledger.core import _asubmit_generation, _submit_generation
from renderqueue_pipeline.reconcile import ReconcileOptions, ReconcileReport, reconcile
from renderqueue_pipeline.simulator.testing import FAST_TEST_OPTIONS, RunningSimulator, wait_until
from renderqueue_pipeline.webhook.app import ReceiverConfig, create_app

INPUTS = {"duration": "5", "resolution": "720p"}


def fal_submitter(webhook_url: str | None = None):

    return lambda endpoint, inputs: (
        fal_client.submit(endpoint, arguments=inputs, webhook_url=webhook_url).request_id
    )


def submit_many(conn: psycopg.Connection, count: int, webhook_url: str | None = None) -> list[str]:
    submit = fal_submitter(webhook_url)
    return [
        _submit_generation(
            conn,
            submit,
            user_id=i % 3,
            endpoint=SEEDANCE,
            inputs={"prompt": f"shot {uuid.uuid4().hex[:6]}", **INPUTS},
        )
        for i in range(count)
    ]


def age_rows(conn: psycopg.Connection, request_ids: list[str], interval: str) -> None:
    """Pretend the rows were submitted `interval` ago."""
    conn.execute(
        "update generations set created_at = created_at - %s::interval where request_id = any(%s)",
        (interval, request_ids),
    )
    conn.commit()


def row(conn: psycopg.Connection, request_id: str) -> dict[str, Any]:
    found = conn.execute("select * from generations where request_id = %s", (request_id,))
    return found.fetchone()


def price_micros_per_second(conn: psycopg.Connection) -> tuple[int, int, Decimal]:
    """The published Seedance 720p price (base, per second, base seconds) in force today."""
    price = conn.execute(
        "select base_micros, micros_per_second, base_seconds from prices "
        "where endpoint = %s and resolution = '720p' and effective_from <= now() "
        "order by effective_from desc limit 1",
        (SEEDANCE,),
    ).fetchone()
    conn.commit()
    return price["base_micros"], price["micros_per_second"], Decimal(price["base_seconds"])


def expected_cost(conn: psycopg.Connection, seconds: Any) -> int:
    """cost = base + round(max(seconds - base_seconds, 0) * per_second), the price table's rule."""
    base, per_second, base_seconds = price_micros_per_second(conn)
    extra = max(Decimal(str(seconds)) - base_seconds, Decimal(0)) * per_second
    return base + int(extra.quantize(Decimal(1), ROUND_HALF_UP))


def _cdn_path(url: str) -> str:
    return urlsplit(url)._replace(query="").geturl()


def assert_matches_ground_truth(
    conn: psycopg.Connection, sim: RunningSimulator, request_ids: list[str]
) -> None:
    truths = {t["request_id"]: t for t in sim.control.ground_truth()}
    for request_id in request_ids:
        truth, got = truths[request_id], row(conn, request_id)
        assert got["status"] == truth["status"], request_id
        if truth["status"] == "completed":
            assert got["outputs"] is not None, request_id
            assert _cdn_path(got["outputs"]["video"]["url"]) == _cdn_path(
                truth["output"]["video"]["url"]
            )
            assert got["cost_micros"] == expected_cost(conn, INPUTS["duration"]), request_id
            assert got["cost_basis"] not in ("none", "estimate"), request_id
        else:
            assert got["cost_micros"] == 0, request_id
            assert got["error"], request_id
    conn.commit()


def run_reconcile(conn: psycopg.Connection, **options: Any) -> ReconcileReport:
    fal = fal_from_env()
    return reconcile(
        conn,
        ReconcileOptions(**{"concurrency": 8, **options}),
        gateway_factory=fal.gateway,
        platform_factory=fal.platform,
    )


def test_lost_webhooks_and_payloadless_completions_reach_ground_truth(
    fal_sim: RunningSimulator, ledger_url: str, conn: psycopg.Connection
) -> None:
    # every webhook lost; some requests fail
    fal_sim.control.reset(seed=3, **FAST_TEST_OPTIONS, webhook_drop_rate=1.0, failure_rate=0.3)
    lost = submit_many(conn, 12)
    # every webhook delivered (to the real receiver) but completions carry no payload
    fal_sim.control.set_faults(webhook_drop_rate=0.0, payload_error_rate=1.0, failure_rate=0.0)
    with serving(create_app(ReceiverConfig(ledger_url, fal_sim.jwks_url))) as receiver:
        empty = submit_many(conn, 6, f"{receiver}/webhooks/fal")
        wait_until(
            lambda: all(row(conn, r)["status"] == "completed" for r in empty) and not conn.commit(),
            timeout=60,
            interval=0.1,
        )
    for request_id in lost:
        fal_sim.control.wait_finished(request_id)
    truths = {t["request_id"]: t for t in fal_sim.control.ground_truth()}
    assert {truths[r]["status"] for r in lost} == {"completed", "failed"}
    assert all(row(conn, r)["status"] == "submitted" for r in lost)
    assert all(row(conn, r)["outputs"] is None for r in empty)
    conn.commit()

    # lost rows are young: a pass now fetches only the payload-less results (first pass)
    first = run_reconcile(conn)
    assert first.examined == len(empty)
    assert first.payloads_filled == len(empty)
    assert all(row(conn, r)["status"] == "submitted" for r in lost)
    conn.commit()

    age_rows(conn, lost, "11 minutes")
    second = run_reconcile(conn)
    assert_matches_ground_truth(conn, fal_sim, lost + empty)
    failed = sum(truths[r]["status"] == "failed" for r in lost)
    assert second.examined == len(lost)
    assert second.advanced == len(lost)
    assert second.failed == failed
    assert second.completed == len(lost) - failed
    assert second.results_fetched >= len(lost) - failed
    assert second.still_open == 0

    third = run_reconcile(conn)  # nothing left to do
    assert third.examined == 0
    assert third.advanced == 0


def test_a_request_fal_does_not_know_becomes_failed_at_no_cost(
    fal_sim: RunningSimulator, conn: psycopg.Connection
) -> None:
    request_id, _ = submit_row(conn, inputs={"prompt": "never reached fal", **INPUTS})
    assert row(conn, request_id)["cost_micros"] > 0  # the estimate
    age_rows(conn, [request_id], "15 minutes")
    report = run_reconcile(conn)
    got = row(conn, request_id)
    assert (got["status"], got["cost_micros"]) == ("failed", 0)
    assert "404" in got["error"]
    assert "does not know" in got["error"]
    assert (report.examined, report.not_found, report.failed) == (1, 1, 1)


def test_a_request_open_past_the_limit_is_cancelled_at_fal_at_no_cost(
    fal_sim: RunningSimulator, conn: psycopg.Connection
) -> None:
    fal_sim.control.reset(seed=1, **{**FAST_TEST_OPTIONS, "queue_delay": "3600"})
    stuck, recent = submit_many(conn, 2)
    age_rows(conn, [stuck], "25 hours")
    age_rows(conn, [recent], "23 hours")
    report = run_reconcile(conn)
    got = row(conn, stuck)
    assert (got["status"], got["cost_micros"]) == ("canceled", 0)
    assert "more than 24 h" in got["error"]
    assert "cancel it (accepted)" in got["error"]
    assert got["cancel_requested_at"] is not None
    # fal was asked: the queued request left fal's queue, so fal will not run or bill it
    truth = fal_sim.control.ground_truth(stuck)
    assert truth["cancel_requested"]
    assert truth["status"] == "canceled"
    assert row(conn, recent)["status"] == "submitted"  # queued at fal, within the limit
    assert fal_sim.control.ground_truth(recent)["status"] == "queued"
    assert (report.examined, report.past_limit, report.still_open, report.canceled) == (2, 1, 1, 1)

    report = run_reconcile(conn, max_open=__import__("datetime").timedelta(hours=2))
    assert row(conn, recent)["status"] == "canceled"  # the limit is configurable


def test_requests_given_up_end_canceled_even_when_fals_error_webhook_comes_first(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str
) -> None:
    """fal sends the ERROR of a cancelled queued request at once, often before its 202
    reaches the reconciler: the intent recorded first makes every one `canceled`."""
    fal_sim.control.reset(seed=2, **{**FAST_TEST_OPTIONS, "queue_delay": "3600"})
    with serving(create_app(ReceiverConfig(ledger_url, fal_sim.jwks_url))) as receiver:
        stuck = submit_many(conn, 12, webhook_url=f"{receiver}/webhooks/fal")
        age_rows(conn, stuck, "25 hours")
        run_reconcile(conn)
        delivered = lambda: {  # noqa: E731
            a["request_id"]
            for a in fal_sim.control.webhook_attempts()
            if a["outcome"] == "delivered"
        }
        wait_until(lambda: delivered() >= set(stuck), timeout=30)
    got = [row(conn, r) for r in stuck]
    conn.commit()
    assert [(g["status"], g["cost_micros"]) for g in got] == [("canceled", 0)] * len(stuck)
    assert all(t["status"] == "canceled" for t in fal_sim.control.ground_truth())


def test_a_request_given_up_that_fal_finishes_anyway_is_billed(
    fal_sim: RunningSimulator, conn: psycopg.Connection
) -> None:
    """Cancelling a running request is only a signal: if fal completes it after we gave up,
    the completion is applied and billed as fal bills it."""
    fal_sim.control.reset(seed=1, **{**FAST_TEST_OPTIONS, "queue_delay": "3600"})
    (request_id,) = submit_many(conn, 1)
    age_rows(conn, [request_id], "25 hours")
    run_reconcile(conn)
    assert row(conn, request_id)["status"] == "canceled"
    late = LedgerEvent(request_id, "completed", {"video": {"url": "https://v3b.fal.media/x.mp4"}})
    assert record_events(conn, [late]) == ["applied"]
    got = row(conn, request_id)
    assert got["status"] == "completed"
    assert got["cost_micros"] > 0


def test_a_requeue_is_not_terminal(fal_sim: RunningSimulator, conn: psycopg.Connection) -> None:
    """fal says IN_QUEUE for a row we saw in progress: it put the request back in its queue."""
    fal_sim.control.reset(seed=1, **{**FAST_TEST_OPTIONS, "queue_delay": "3600"})
    (request_id,) = submit_many(conn, 1)
    record_events(conn, [LedgerEvent(request_id, "in_progress", source="webhook")])
    age_rows(conn, [request_id], "30 minutes")
    report = run_reconcile(conn)
    assert row(conn, request_id)["status"] == "in_progress"
    assert (report.requeued, report.still_open, report.advanced) == (1, 1, 0)


def test_a_model_error_is_a_terminal_failure_with_fal_detail(
    fal_sim: RunningSimulator, conn: psycopg.Connection
) -> None:
    fal_sim.control.reset(seed=1, **FAST_TEST_OPTIONS, webhook_drop_rate=1.0, failure_rate=1.0)
    (request_id,) = submit_many(conn, 1)
    fal_sim.control.wait_finished(request_id)
    age_rows(conn, [request_id], "11 minutes")
    report = run_reconcile(conn)
    got = row(conn, request_id)
    assert (got["status"], got["cost_micros"]) == ("failed", 0)
    assert got["error"].startswith("fal: ")
    assert report.failed == 1


def test_young_rows_are_left_alone_and_the_age_is_configurable(
    fal_sim: RunningSimulator, conn: psycopg.Connection
) -> None:
    fal_sim.control.reset(seed=1, **FAST_TEST_OPTIONS, webhook_drop_rate=1.0)
    (request_id,) = submit_many(conn, 1)
    fal_sim.control.wait_finished(request_id)
    assert run_reconcile(conn).examined == 0
    assert row(conn, request_id)["status"] == "submitted"
    conn.commit()
    report = run_reconcile(conn, min_age=__import__("datetime").timedelta(0))
    assert report.examined == 1
    assert row(conn, request_id)["status"] == "completed"


def one_try(n: int) -> FalGateway:
    """A gateway that asks once (no backoff between tries: the test needs no waiting)."""
    return FalGateway(max_concurrency=n, retry_attempts=1)


def test_fal_unreachable_leaves_rows_open_for_the_next_pass(
    fal_sim: RunningSimulator, conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:

    monkeypatch.setattr(fal_client.client, "MAX_ATTEMPTS", 1)  # fal-client's own retries
    request_id, _ = submit_row(conn, inputs={"prompt": "fal is down", **INPUTS})
    age_rows(conn, [request_id], "15 minutes")
    fal_sim.control.set_faults(api_unreachable=True)  # the socket stays bound: no port race
    report = reconcile(
        conn,
        ReconcileOptions(concurrency=2),
        gateway_factory=one_try,
        platform_factory=fal_from_env().platform,
    )
    assert row(conn, request_id)["status"] == "submitted"
    assert (report.examined, report.fal_errors, report.still_open) == (1, 1, 1)
    assert report.fal_error_samples
    assert "unreachable" in report.fal_error_samples[0]


@pytest.mark.parametrize("fault", ["unreachable", "500", "503"])
def test_a_give_up_whose_cancel_gets_no_answer_stays_open_until_fal_answers(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    """Past the limit, a cancel fal never answered ends nothing: the next pass asks again."""

    monkeypatch.setattr(fal_client.client, "MAX_ATTEMPTS", 1)  # fal-client's own retries
    fal_sim.control.reset(
        seed=1, **{**FAST_TEST_OPTIONS, "queue_delay": "3600", "cancel_fault": fault}
    )
    (request_id,) = submit_many(conn, 1)
    age_rows(conn, [request_id], "25 hours")
    estimate = row(conn, request_id)["cost_micros"]

    report = reconcile(
        conn,
        ReconcileOptions(concurrency=2),
        gateway_factory=one_try,
        platform_factory=fal_from_env().platform,
    )

    got = row(conn, request_id)
    assert (got["status"], got["cost_micros"], got["error"]) == ("submitted", estimate, None)
    assert (report.fal_errors, report.still_open, report.failed, report.canceled) == (1, 1, 0, 0)
    assert "cancel" in report.fal_error_samples[0]
    assert not fal_sim.control.ground_truth(request_id)["cancel_requested"]

    fal_sim.control.set_faults(cancel_fault="none")  # fal answers again
    report = run_reconcile(conn)
    assert row(conn, request_id)["status"] == "canceled"
    assert fal_sim.control.ground_truth(request_id)["status"] == "canceled"


def test_a_give_up_fal_did_not_answer_is_billed_without_conflict_when_fal_finishes_it(
    fal_sim: RunningSimulator, conn: psycopg.Connection
) -> None:
    """The review's case: the row must not be a $0 failure that fal's completion contradicts."""
    fal_sim.control.reset(
        seed=1, **{**FAST_TEST_OPTIONS, "queue_delay": "3600", "cancel_fault": "500"}
    )
    (request_id,) = submit_many(conn, 1)
    age_rows(conn, [request_id], "25 hours")
    reconcile(
        conn,
        ReconcileOptions(concurrency=2),
        gateway_factory=one_try,
        platform_factory=fal_from_env().platform,
    )
    done = LedgerEvent(request_id, "completed", {"video": {"url": "https://v3b.fal.media/x.mp4"}})
    assert record_events(conn, [done]) == ["applied"]
    got = row(conn, request_id)
    assert (got["status"], got["conflict"]) == ("completed", False)
    assert got["cost_micros"] == expected_cost(conn, INPUTS["duration"])


@pytest.mark.parametrize("field", ["concurrency", "max_rows", "chunk"])
def test_options_refuse_nonsense(field: str) -> None:
    with pytest.raises(ValueError, match=field.split("_")[0]):
        ReconcileOptions(**{field: 0})


def test_a_cancel_fal_accepted_is_confirmed_by_the_error_that_follows(
    fal_sim: RunningSimulator, conn: psycopg.Connection
) -> None:
    """The reconciler records fal's ERROR as it is; the ledger's rule makes it `canceled`."""

    fal_sim.control.reset(
        seed=1, **{**FAST_TEST_OPTIONS, "queue_delay": "3600", "webhook_drop_rate": 1.0}
    )
    canceled, queued = submit_many(conn, 2)

    async def cancel() -> str:
        async with FalGateway() as fal:
            return await fal.cancel(SEEDANCE, canceled)

    assert asyncio.run(cancel()) == "cancellation_requested"
    assert mark_cancel_requested(conn, canceled)
    fal_sim.control.wait_finished(canceled)
    age_rows(conn, [canceled, queued], "11 minutes")
    report = run_reconcile(conn)
    got = row(conn, canceled)
    assert (got["status"], got["cost_micros"]) == ("canceled", 0)
    assert row(conn, queued)["status"] == "submitted"  # still queued at fal
    assert (report.canceled, report.failed, report.still_open) == (1, 0, 1)
    events = conn.execute(
        "select source, kind from generation_events where request_id = %s", (canceled,)
    ).fetchall()
    assert events == [{"source": "reconcile", "kind": "failed"}]  # no guessed cancel string


def test_fals_504_user_timeout_is_a_terminal_failure(
    fal_sim: RunningSimulator, conn: psycopg.Connection
) -> None:
    """A request not started within its start_timeout: fal answers its result with 504."""

    fal_sim.control.reset(
        seed=1, **{**FAST_TEST_OPTIONS, "queue_delay": "30", "webhook_drop_rate": 1.0}
    )

    async def submit() -> str:
        async with FalGateway(start_timeouts={SEEDANCE: 1.5}) as fal:

            async def call(endpoint: str, inputs: dict) -> str:
                return (await fal.submit(endpoint, inputs)).request_id

            return await _asubmit_generation(
                conn,
                call,
                user_id=1,
                endpoint=SEEDANCE,
                inputs={"prompt": "never started", **INPUTS},
            )

    request_id = asyncio.run(submit())
    truth = fal_sim.control.wait_finished(request_id, timeout=30)
    assert truth["status"] == "failed"
    age_rows(conn, [request_id], "11 minutes")
    report = run_reconcile(conn)
    got = row(conn, request_id)
    assert (got["status"], got["cost_micros"]) == ("failed", 0)
    assert "504" in got["error"] or "timed out" in got["error"]
    assert (report.failed, report.still_open, report.fal_errors) == (1, 0, 0)


def test_the_cli_runs_the_same_pass_and_prints_its_figures(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_env: str
) -> None:

    fal_sim.control.reset(seed=2, **FAST_TEST_OPTIONS, webhook_drop_rate=1.0)
    (request_id,) = submit_many(conn, 1)
    fal_sim.control.wait_finished(request_id)
    age_rows(conn, [request_id], "11 minutes")
    result = CliRunner().invoke(main, ["reconcile", "--concurrency", "2"])
    assert result.exit_code == 0, result.output
    assert row(conn, request_id)["status"] == "completed"
    for figure in ("rows examined", "rows advanced", "still open", "failed", "results fetched"):
        assert figure in result.output
    assert "seconds" in result.output
    bad = CliRunner().invoke(main, ["reconcile", "--concurrency", "0"])
    assert bad.exit_code != 0
    assert "concurrency" in bad.output
