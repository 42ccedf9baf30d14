"""One key reaches fal once; one budget admission, at send time, in the send's month; the
reconciler marks `unknown` only what a stopped sender left (issue 18: 1, 2 and 9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from batch_helpers import SEEDANCE, prompts, seedance_720p_micros, submit_file, write_csv
from click.testing import CliRunner
from ledger_helpers import video_payload

from renderqueue_pipeline.batch import (
    BatchOptions,
    BudgetExceeded,
    SubmissionInProgress,
    month_figures,
    set_budget,
    submit_prompt,
)
from renderqueue_pipeline.cli import main
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.errors import LedgerInputError
from renderqueue_pipeline.ledger import (
    LedgerEvent,
    begin_submission,
    finish_submission,
    mark_cancel_requested,
    mark_unknown_outcomes,
    record_event,
    record_intent,
    record_submitted,
)
from renderqueue_pipeline.simulator.testing import RunningSimulator, wait_until

ROW = seedance_720p_micros(5)  # every request here: Seedance 720p, 5 s ($1.517)
INPUTS = {"prompt": "a red fox in fresh snow", "duration": "5"}


def at(url: str, moment: datetime | str) -> str:
    """The ledger URL with its clock (`rq_now()`) set to `moment` for every session."""
    text = moment if isinstance(moment, str) else moment.isoformat()
    return f"{url}{'&' if '?' in url else '?'}options={quote(f'-c renderqueue.now={text}')}"


def item_by_key(url: str, key: str) -> dict | None:
    with connect(url, autocommit=True) as c:
        return c.execute("select * from batch_items where idempotency_key = %s", (key,)).fetchone()


def generations_of(url: str, item_id: int) -> list[dict]:
    with connect(url, autocommit=True) as c:
        return c.execute(
            "select * from generations where batch_item_id = %s order by id", (item_id,)
        ).fetchall()


def state_of(url: str, item_id: int) -> str:
    with connect(url, autocommit=True) as c:
        return c.execute("select state from batch_items where id = %s", (item_id,)).fetchone()[
            "state"
        ]


def later(hours: float = 1) -> datetime:
    """A moment past any lease: the ledger's clock, moved forward (no sleeping)."""
    return datetime.now(UTC) + timedelta(hours=hours)


# -- 1. one idempotency key, at most one request at fal ----------------------------------


def test_one_idempotency_key_reaches_fal_once_when_two_calls_race(
    fal_sim: RunningSimulator, ledger_url: str, settings_env: Callable[..., None]
) -> None:
    settings_env(RENDERQUEUE_SUBMIT_WAIT_SECONDS="60")  # however slow the machine
    fal_sim.control.set_faults(submit_latency=2.5)
    key = f"order-{uuid.uuid4().hex}"
    answers: dict[str, object] = {}

    def call(name: str) -> None:
        try:
            answers[name] = submit_prompt(
                7, SEEDANCE, "a fox", {"duration": "5"}, idempotency_key=key, ledger_url=ledger_url
            )
        except Exception as exc:  # noqa: BLE001 - kept for the assertion, whatever it is
            answers[name] = exc

    first = threading.Thread(target=call, args=("first",))
    first.start()
    deadline = time.monotonic() + 30
    while item_by_key(ledger_url, key) is None:  # the first call's intent is committed
        assert time.monotonic() < deadline, "the first call never recorded its intent"
        time.sleep(0.02)
    second = threading.Thread(target=call, args=("second",))
    second.start()
    first.join(60)
    second.join(60)

    assert isinstance(answers["first"], str), answers
    assert answers["second"] == answers["first"]
    assert [t["request_id"] for t in fal_sim.control.ground_truth()] == [answers["first"]]
    item = item_by_key(ledger_url, key)
    assert [g["request_id"] for g in generations_of(ledger_url, item["id"])] == [answers["first"]]


def test_a_second_submit_of_a_key_in_flight_exits_with_its_own_code_and_sends_nothing(
    fal_sim: RunningSimulator, ledger_env: str, settings_env: Callable[..., None]
) -> None:
    fal_sim.control.set_faults(submit_latency=4)
    settings_env(RENDERQUEUE_SUBMIT_WAIT_SECONDS="0.2")
    key = f"order-{uuid.uuid4().hex}"
    args = ["submit", "--user-id", "7", "--endpoint", SEEDANCE, "--prompt", "a fox"]
    first = threading.Thread(
        target=submit_prompt,
        args=(7, SEEDANCE, "a fox", {"duration": "5"}),
        kwargs={"idempotency_key": key, "ledger_url": ledger_env},
    )
    first.start()
    while item_by_key(ledger_env, key) is None:
        time.sleep(0.02)
    result = CliRunner().invoke(main, [*args, "--input", "duration=5", "--idempotency-key", key])
    first.join(60)
    assert result.exit_code == 75, result.stderr
    assert "is being submitted by another caller" in result.stderr
    assert len(fal_sim.control.ground_truth()) == 1
    assert "75 the idempotency key is being submitted" in " ".join(
        CliRunner().invoke(main, ["submit", "--help"]).stdout.split()
    )


def test_an_item_left_pending_by_a_crash_is_never_resent_by_submit(
    fal_sim: RunningSimulator, ledger_url: str, settings_env: Callable[..., None]
) -> None:
    settings_env(RENDERQUEUE_SUBMIT_WAIT_SECONDS="0.2")
    key = f"order-{uuid.uuid4().hex}"
    # a caller claimed the key, and its process died before fal answered (or before it
    # called fal: nobody can tell which)
    with connect(ledger_url, autocommit=True) as dead:
        begin_submission(dead, user_id=7, endpoint=SEEDANCE, inputs=INPUTS, idempotency_key=key)
    with pytest.raises(SubmissionInProgress, match="another caller"):
        submit_prompt(
            7, SEEDANCE, INPUTS["prompt"], {"duration": "5"}, idempotency_key=key,
            ledger_url=ledger_url,
        )  # fmt: skip
    # long after, its lease expired: still not resent, the reconciler settles it
    with pytest.raises(SubmissionInProgress, match="sender that stopped"):
        submit_prompt(
            7, SEEDANCE, INPUTS["prompt"], {"duration": "5"}, idempotency_key=key,
            ledger_url=at(ledger_url, later()),
        )  # fmt: skip
    assert fal_sim.control.ground_truth() == []
    assert item_by_key(ledger_url, key)["state"] == "pending"


def test_a_request_id_is_recorded_only_on_the_pending_item_its_caller_claimed(
    ledger_url: str,
) -> None:
    with connect(ledger_url, autocommit=True) as conn:
        mine = begin_submission(conn, user_id=7, endpoint=SEEDANCE, inputs=INPUTS)
        record_submitted(conn, mine, "req-first")
        record_submitted(conn, mine, "req-first")  # the same answer again: a no-op
        with pytest.raises(LedgerInputError, match=f"item {mine.item_id} is submitted"):
            record_submitted(conn, mine, "req-second")
        other = begin_submission(conn, user_id=7, endpoint=SEEDANCE, inputs=INPUTS)
        with pytest.raises(LedgerInputError, match="not the pending item claimed by"):
            record_submitted(conn, replace(other, claimer="api:somebody-else"), "req-third")
    assert [g["request_id"] for g in generations_of(ledger_url, mine.item_id)] == ["req-first"]
    assert generations_of(ledger_url, other.item_id) == []


# -- 2. one admission, at send time, in the month the request reaches fal ----------------


def test_unknown_items_of_last_month_resubmitted_now_are_admitted_against_this_month(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "three.csv", prompts(3))
    options = {"default_endpoint": SEEDANCE, "concurrency": 3}
    # 2027-01-31 23:58: a real `renderqueue batch submit` sends three rows while fal's edge
    # answers 503 (fal-client keeps retrying: nothing reaches fal), and is killed
    fal_sim.control.set_faults(api_503_rate=1.0)
    env = {
        **os.environ,
        "DATABASE_URL": at(ledger_url, "2027-01-31T23:58:00Z"),
        "RENDERQUEUE_HOME": str(tmp_path / "home"),
    }
    command = [sys.executable, "-m", "renderqueue_pipeline.cli", "batch", "submit", str(path)]
    process = subprocess.Popen(
        [*command, "--endpoint", SEEDANCE, "--concurrency", "3"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def all_sent() -> bool:
        with connect(ledger_url, autocommit=True) as c:
            row = c.execute("select count(sent_at) as n from batch_items").fetchone()
        return row["n"] == 3

    try:
        wait_until(all_sent, timeout=60, interval=0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert fal_sim.control.ground_truth() == []
    fal_sim.control.set_faults(api_503_rate=0.0)
    set_budget(conn, 7, 2_000_000, date(2027, 2, 1))
    conn.commit()

    again = submit_file(
        path.as_uri(),
        BatchOptions(**options, resubmit_unknown=True),
        ledger_url=at(ledger_url, "2027-02-01T00:00:30Z"),
    )
    assert (again.report.counts["submitted"], again.report.counts["over_budget"]) == (1, 2)
    assert again.stats.over_budget == 2
    reasons = [r["reason"] for r in again.report.rejections]
    assert reasons[0] == (
        "user 7 over the monthly budget $2.00 for 2027-02: spent $0.00 + in flight $1.517 "
        "+ this row $1.517 = $3.034"
    )
    february = month_figures(conn, 7, date(2027, 2, 1))
    assert february.committed_micros == ROW
    assert february.remaining_micros >= 0
    # the three were marked unknown by this run (their sender is gone); fal's request list
    # showed none of them, so they were resent, each admitted in February: one fits
    assert again.stats.orphaned == 3
    assert again.stats.resubmitted_unknown == 3
    assert len(fal_sim.control.ground_truth()) == 1
    sent = conn.execute("select created_at from generations where user_id = 7").fetchall()
    assert [g["created_at"] for g in sent] == [datetime(2027, 2, 1, 0, 0, 30, tzinfo=UTC)]


def test_a_request_counts_in_the_month_it_was_sent_even_if_recorded_after_midnight(
    ledger_url: str,
) -> None:
    with connect(at(ledger_url, "2027-01-31T23:59:59Z"), autocommit=True) as before:
        intent = begin_submission(before, user_id=9, endpoint=SEEDANCE, inputs=INPUTS)
    with connect(at(ledger_url, "2027-02-01T00:00:01Z"), autocommit=True) as after:
        finish_submission(after, intent, "req-midnight")
        row = after.execute(
            "select created_at from generations where request_id = 'req-midnight'"
        ).fetchone()
        january = month_figures(after, 9, date(2027, 1, 1))
        february = month_figures(after, 9, date(2027, 2, 1))
    assert row["created_at"] == datetime(2027, 1, 31, 23, 59, 59, tzinfo=UTC)
    assert (january.in_flight_micros, february.in_flight_micros) == (ROW, 0)


def test_budgets_count_completed_spend_and_failed_or_canceled_rows_release_their_estimate(
    ledger_url: str,
) -> None:
    url = at(ledger_url, "2027-03-10T12:00:00Z")
    with connect(url, autocommit=True) as conn:
        set_budget(conn, 5, 2 * ROW)

        def send(prompt: str) -> str:
            inputs = {**INPUTS, "prompt": prompt}
            intent = begin_submission(conn, user_id=5, endpoint=SEEDANCE, inputs=inputs)
            return finish_submission(conn, intent, f"req-{prompt}")

        send("a")
        send("b")
        with pytest.raises(BudgetExceeded, match=r"spent \$0.00 \+ in flight \$3.034"):
            send("c")
        record_event(conn, LedgerEvent("req-b", "failed", None, "boom"))  # releases b
        send("c")
        record_event(conn, LedgerEvent("req-a", "completed", video_payload()))
        figures = month_figures(conn, 5)
        assert (figures.actual_micros, figures.in_flight_micros) == (ROW, ROW)
        with pytest.raises(BudgetExceeded, match=r"spent \$1.517 \+ in flight \$1.517"):
            send("d")
        mark_cancel_requested(conn, "req-c")
        record_event(conn, LedgerEvent("req-c", "failed", None, "cancelled"))  # canceled
        assert (
            conn.execute(
                "select status::text from generations where request_id = 'req-c'"
            ).fetchone()["status"]
            == "canceled"
        )
        send("d")
        figures = month_figures(conn, 5)
        assert (figures.actual_micros, figures.in_flight_micros) == (ROW, ROW)


def test_last_months_spend_does_not_count_against_this_month(ledger_url: str) -> None:
    with connect(at(ledger_url, "2027-04-30T23:59:00Z"), autocommit=True) as april:
        set_budget(april, 6, ROW, date(2027, 5, 1))
        intent = begin_submission(april, user_id=6, endpoint=SEEDANCE, inputs=INPUTS)
        finish_submission(april, intent, "req-april")
        record_event(april, LedgerEvent("req-april", "completed", video_payload()))
    with connect(at(ledger_url, "2027-05-01T00:01:00Z"), autocommit=True) as may:
        figures = month_figures(may, 6)
        assert (figures.month, figures.actual_micros, figures.in_flight_micros) == (
            date(2027, 5, 1), 0, 0,
        )  # fmt: skip
        intent = begin_submission(may, user_id=6, endpoint=SEEDANCE, inputs=INPUTS)
        finish_submission(may, intent, "req-may")  # ROW of a ROW budget: fits exactly
        assert month_figures(may, 6).remaining_micros == 0


# -- 9. leases: only a stopped sender's items become unknown; a definite outcome wins ----


def test_only_items_whose_senders_lease_expired_are_marked_unknown(ledger_url: str) -> None:
    with connect(ledger_url, autocommit=True) as conn:
        intent = begin_submission(conn, user_id=7, endpoint=SEEDANCE, inputs=INPUTS)
        with conn.transaction():  # a run's intent, recorded but never sent
            unsent = record_intent(
                conn, user_id=7, endpoint=SEEDANCE, inputs=INPUTS, claimer="run:gone"
            )
        assert mark_unknown_outcomes(conn, "0 seconds") == []  # its sender may be alive
    with connect(at(ledger_url, later()), autocommit=True) as conn:
        marked = mark_unknown_outcomes(conn, "10 minutes")
    assert [m["id"] for m in marked] == [intent.item_id]  # the unsent one is not at fal
    assert state_of(ledger_url, unsent.item_id) == "pending"


def test_the_reconciler_leaves_a_live_runs_items_alone_while_fal_throttles_it(
    fal_sim: RunningSimulator,
    ledger_url: str,
    tmp_path: Path,
    settings_env: Callable[..., None],
) -> None:
    settings_env(RENDERQUEUE_SUBMIT_LEASE_SECONDS="4")  # refreshed every second
    fal_sim.control.set_faults(api_429_rate=1.0)
    path = write_csv(tmp_path / "throttled.csv", prompts(4))
    done: dict[str, object] = {}

    def run() -> None:
        done["result"] = submit_file(
            path.as_uri(),
            BatchOptions(default_endpoint=SEEDANCE, concurrency=2),
            ledger_url=ledger_url,
        )

    runner = threading.Thread(target=run)
    runner.start()
    marked: list[dict] = []
    with connect(ledger_url, autocommit=True) as conn:
        started = time.monotonic()
        while time.monotonic() - started < 6:  # past the first lease, throttled all along
            marked += mark_unknown_outcomes(conn, "0 seconds")
            time.sleep(0.25)
        fal_sim.control.set_faults(api_429_rate=0.0)
        runner.join(120)
        states = [r["state"] for r in conn.execute("select state from batch_items")]
    assert marked == []
    assert fal_sim.control.health()["api_faults"]["429"] > 0  # throttled all along
    assert done["result"].report.counts["submitted"] == 4
    assert states == ["submitted"] * 4


def test_a_definite_outcome_after_unknown_wins_and_releases_the_budget(ledger_url: str) -> None:
    with connect(ledger_url, autocommit=True) as conn:
        accepted = begin_submission(conn, user_id=8, endpoint=SEEDANCE, inputs=INPUTS)
        refused = begin_submission(conn, user_id=8, endpoint=SEEDANCE, inputs=INPUTS)
    with connect(at(ledger_url, later()), autocommit=True) as conn:
        assert len(mark_unknown_outcomes(conn)) == 2
    with connect(ledger_url, autocommit=True) as conn:
        month = conn.execute("select date_trunc('month', rq_now())::date as m").fetchone()["m"]
        assert month_figures(conn, 8, month).in_flight_micros == 2 * ROW
        finish_submission(conn, accepted, "req-late-answer")
        with pytest.raises(ValueError, match="fal 422: duration"):
            finish_submission(conn, refused, ValueError("fal 422: duration"), lambda exc: True)
        states = dict(
            (r["id"], (r["state"], r["request_id"]))
            for r in conn.execute("select id, state, request_id from batch_items")
        )
        assert states == {
            accepted.item_id: ("submitted", "req-late-answer"),
            refused.item_id: ("rejected", None),
        }
        assert month_figures(conn, 8, month).in_flight_micros == ROW  # the generation's
