"""Nothing billed goes unnamed: our tags on every request, fal's request list, adoption.

Real parts throughout: the batch runs as a real process killed with SIGKILL, fal-client
talks TLS to the simulator, the reconciler reads the simulator's Platform API.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import ssl
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import fal_client
import httpx
import psycopg
import pytest
from batch_helpers import SEEDANCE, items, prompts, submit_file, write_csv
from click.testing import CliRunner
from ledger_helpers import fal_from_env
from spend_helpers import FalBilling

from renderqueue_pipeline.batch import BatchOptions
from renderqueue_pipeline.batch.single import submit_prompt
from renderqueue_pipeline.batch.submit import BatchConfigError
from renderqueue_pipeline.cli import main
from renderqueue_pipeline.defs.reconcile.checks import fal_orphans_are_explained
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.fal_gateway import (
    FalGateway,
    FalTagError,
    RequestIdentity,
    decode_tags,
    encode_tags,
)
from renderqueue_pipeline.fal_platform import FalPlatformError
from renderqueue_pipeline.ledger import LedgerEvent, record_events
from renderqueue_pipeline.reconcile import ReconcileOptions, reconcile
from renderqueue_pipeline.simulator.engine import lost_answer_draw
from renderqueue_pipeline.simulator.testing import RunningSimulator, wait_until

INPUTS = {"prompt": "a red fox in fresh snow", "duration": "5"}


def _window() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(hours=1), now + dt.timedelta(minutes=1)


def _adopt(conn: psycopg.Connection, billing: FalBilling, **options) -> object:
    options.setdefault("min_age", timedelta(0))
    return reconcile(
        conn,
        ReconcileOptions(adopt="on", **options),
        gateway_factory=fal_from_env().gateway,
        platform_factory=billing.platform,
    )


def _submit(path: Path, ledger_url: str, billing: FalBilling | None = None, **options):
    options.setdefault("default_endpoint", SEEDANCE)
    options.setdefault("concurrency", 4)
    log: list[str] = []
    result = submit_file(
        path.as_uri(),
        BatchOptions(**options),
        ledger_url=ledger_url,
        log=log.append,
        platform_factory=billing.platform if billing else None,
    )
    return result, log


# ----- tags -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["42", "ann,bob=carol", "zoë 東京 %41", "a=b,c=d,fal.x=y", " spaced "]
)
def test_tag_values_with_commas_equals_or_non_ascii_survive_the_header(value: str) -> None:
    header = encode_tags({"rq_item": "7", "rq_user": value})
    assert header.isascii()
    assert header.count(",") == 1
    assert header.count("=") == 2
    assert decode_tags(header) == {"rq_item": "7", "rq_user": value}


@pytest.mark.parametrize(
    ("tags", "words"),
    [
        ({f"k{i}": "v" for i in range(11)}, "at most 10"),
        ({"fal.owner": "me"}, "reserved"),
        ({"k" * 65: "v"}, "over 64"),
        ({"rq_user": "x" * 257}, "fal allows 256"),
        ({"rq_user": "é" * 50}, "fal allows 256"),  # 300 characters once encoded
        ({f"k{i}": "v" * 120 for i in range(9)}, "1024 in all"),
        ({"bad key": "v"}, "letters, digits"),
    ],
)
def test_tags_fal_would_refuse_are_refused_before_anything_is_sent(
    fal_sim: RunningSimulator, tags: dict[str, str], words: str
) -> None:
    async def go() -> None:
        async with FalGateway() as fal:
            await fal.submit(SEEDANCE, INPUTS, tags=tags)

    with pytest.raises(FalTagError, match=words):
        asyncio.run(go())
    assert fal_sim.control.ground_truth() == []


def test_a_submit_carries_its_item_user_and_batch_in_x_fal_tags(fal_sim: RunningSimulator) -> None:
    async def go() -> str:
        async with FalGateway() as fal:
            identity = RequestIdentity(item_id=12, user_id="ann,bob=é", batch_id=3)
            return (await fal.submit(SEEDANCE, INPUTS, identity=identity)).request_id

    request_id = asyncio.run(go())
    truth = fal_sim.control.ground_truth(request_id)
    assert truth["tags"] == {"rq_item": "12", "rq_user": "ann%2Cbob%3D%C3%A9", "rq_batch": "3"}
    assert decode_tags(truth["tags"])["rq_user"] == "ann,bob=é"


def test_batch_rows_and_single_submits_are_tagged_with_their_items(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    result, _ = _submit(write_csv(tmp_path / "a.csv", prompts(3)), ledger_url)
    single = submit_prompt(7, SEEDANCE, "an owl at dusk", {"duration": "5"}, ledger_url=ledger_url)
    tags = {t["request_id"]: t["tags"] for t in fal_sim.control.ground_truth()}
    want = {
        i["request_id"]: {"rq_item": str(i["id"]), "rq_user": "7"}
        | ({"rq_batch": str(result.batch_id)} if i["batch_id"] else {})
        for i in items(conn)
    }
    assert single in want
    assert len(want) == 4
    assert tags == want


# ----- the simulator's request list -------------------------------------------------------------


def test_the_request_list_filters_by_status_window_and_id_and_pages(
    fal_sim: RunningSimulator,
    fal_billing: FalBilling,
) -> None:
    fal_sim.control.set_faults(failure_rate=0.5, seed=3)

    async def go() -> list[str]:
        async with FalGateway() as fal:
            return [
                (await fal.submit(SEEDANCE, INPUTS, tags={"rq_item": str(i)})).request_id
                for i in range(7)
            ]

    ids = asyncio.run(go())
    truths = [fal_sim.control.wait_finished(r) for r in ids]
    ok = {t["request_id"] for t in truths if t["status"] == "completed"}
    assert 0 < len(ok) < 7  # both endings, fixed by the seed
    start, end = _window()
    with fal_billing.platform() as platform:
        listed = list(platform.requests_by_endpoint(SEEDANCE, start, end, page_size=2))
        assert [e["request_id"] for e in listed] == ids  # every page, in order, once
        assert [decode_tags(e["tags"]) for e in listed] == [{"rq_item": str(i)} for i in range(7)]
        good = platform.requests_by_endpoint(SEEDANCE, start, end, statuses=["success"])
        assert {e["request_id"] for e in good} == ok
        bad = platform.requests_by_endpoint(SEEDANCE, start, end, statuses=["user_error"])
        assert {e["request_id"] for e in bad} == set(ids) - ok
        one = list(platform.requests_by_endpoint(SEEDANCE, start, end, request_ids=[ids[3]]))
        assert [e["request_id"] for e in one] == [ids[3]]
        assert one[0]["tags"] == {"rq_item": "3"}
        assert "json_input" not in one[0]
        with_payloads = platform.requests_by_endpoint(
            SEEDANCE, start, end, request_ids=[ids[3]], payloads=True
        )
        assert next(iter(with_payloads))["json_input"]["prompt"] == INPUTS["prompt"]
        later = list(platform.requests_by_endpoint(SEEDANCE, end, end + dt.timedelta(hours=1)))
        assert later == []
        assert list(platform.requests_by_endpoint("fal-ai/veo3.1", start, end)) == []
    control = httpx.Client(
        base_url=fal_billing.server.api_url,
        verify=ssl.create_default_context(cafile=fal_sim.ca_bundle),
    )
    with control:
        auth = {"Authorization": "Key admin-secret-key"}
        path = "/models/requests/by-endpoint"
        too_many = control.get(path, params={"endpoint_id": SEEDANCE, "limit": 101}, headers=auth)
        assert too_many.status_code == 422
        assert "limit" in too_many.text
        wrong = control.get(path, params={"endpoint_id": SEEDANCE, "status": "ok"}, headers=auth)
        assert wrong.status_code == 422
        assert "status" in wrong.text
        assert control.get(path, params={"endpoint_id": SEEDANCE}).status_code == 401
        default = control.get(path, params={"endpoint_id": SEEDANCE}, headers=auth).json()
        assert len(default["items"]) == 7
        assert default["has_more"] is False


# ----- adoption ---------------------------------------------------------------------------------


def _kill_batch_after(
    fal_sim: RunningSimulator, path: Path, ledger_url: str, home: Path, at_fal: int
) -> None:
    """Run `renderqueue batch submit` as a real process; SIGKILL it once fal holds
    `at_fal` of its requests (fal answers them only after 30 s: never, for this run)."""
    fal_sim.control.set_faults(submit_latency=30)
    env = {**os.environ, "DATABASE_URL": ledger_url, "RENDERQUEUE_HOME": str(home)}
    command = [sys.executable, "-m", "renderqueue_pipeline.cli", "batch", "submit", str(path)]
    command += ["--endpoint", SEEDANCE, "--concurrency", str(at_fal)]
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: len(fal_sim.control.ground_truth()) == at_fal, timeout=60)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    fal_sim.control.set_faults(submit_latency=0)


def test_requests_a_killed_batch_left_at_fal_are_adopted_and_never_resent(
    fal_sim: RunningSimulator,
    fal_billing: FalBilling,
    conn: psycopg.Connection,
    ledger_url: str,
    tmp_path: Path,
) -> None:
    """The issue's scenario: 120 rows, killed -9 once 30 requests reached fal, run again,
    then the reconciler: every request at fal is named, none was sent twice."""
    path = write_csv(tmp_path / "a.csv", prompts(120))
    _kill_batch_after(fal_sim, path, ledger_url, tmp_path / "home", at_fal=30)
    assert conn.execute("select count(*) as n from generations").fetchone()["n"] == 0
    conn.commit()

    rerun, _ = _submit(path, ledger_url, concurrency=8)
    counts = rerun.report.counts
    assert (counts["submitted"], counts["unknown"]) == (90, 30)
    # a webhook that came for one of fal's requests while no row named it waits stored
    early = next(t for t in fal_sim.control.ground_truth() if t["index"] == 0)
    early = fal_sim.control.wait_finished(early["request_id"])
    record_events(conn, [LedgerEvent(early["request_id"], "completed", early["output"])])
    report = _adopt(conn, fal_billing)
    assert report.adoption.adopted == 30
    assert report.adoption.orphans == 0

    truth = {t["request_id"]: t for t in fal_sim.control.ground_truth()}
    assert len(truth) == 120
    rows = {
        g["request_id"]: g
        for g in conn.execute(
            "select g.*, i.inputs ->> 'prompt' as item_prompt, i.state as item_state "
            "from generations g join batch_items i on i.id = g.batch_item_id"
        )
    }
    assert set(rows) == set(truth)  # every request at fal is in a generations row
    for request_id, row in rows.items():
        assert row["item_prompt"] == truth[request_id]["inputs"]["prompt"]
        assert row["item_state"] == "submitted"
        assert row["duplicate_of"] is None
        assert row["user_id"] == 7
        assert row["cost_micros"] > 0
    sent = sorted(t["inputs"]["prompt"] for t in truth.values())
    assert sent == sorted(r["prompt"] for r in prompts(120))  # none sent twice
    states = {i["state"] for i in items(conn)}
    assert states == {"submitted"}
    orphans = conn.execute("select count(*) as n from fal_orphan_requests").fetchone()["n"]
    assert orphans == 0

    # a second pass re-reads its lookback: all known, nothing recorded twice; without a
    # lookback it reads only what fal got since the last pass ended (nothing)
    second = _adopt(conn, fal_billing)
    assert (second.adoption.listed, second.adoption.known) == (120, 120)
    assert (second.adoption.adopted, second.adoption.duplicates) == (0, 0)
    assert second.adoption.orphans == 0
    assert _adopt(conn, fal_billing, adopt_lookback=timedelta(0)).adoption.listed == 0

    # the waiting webhook applied as its row appeared; the usual status path finishes the rest
    row = conn.execute(
        "select status::text, outputs from generations where request_id = %s",
        [early["request_id"]],
    ).fetchone()
    assert row["status"] == "completed"
    assert row["outputs"] == early["output"]
    for request_id in truth:
        fal_sim.control.wait_finished(request_id)
    _adopt(conn, fal_billing)
    finished = dict.fromkeys(truth, "completed")
    got = conn.execute("select request_id, status::text as status from generations").fetchall()
    assert {r["request_id"]: r["status"] for r in got} == finished


def test_a_submit_retried_after_its_answer_was_lost_is_found_and_cancelled(
    fal_sim: RunningSimulator,
    fal_billing: FalBilling,
    conn: psycopg.Connection,
    ledger_url: str,
) -> None:
    # a seed whose first submit loses its answer (fal enqueued it) and whose second does not
    seed = next(s for s in range(1000) if lost_answer_draw(s, 0) < 0.5 <= lost_answer_draw(s, 1))
    fal_sim.control.set_faults(seed=seed, submit_lost_answer_rate=0.5, queue_delay="60")
    request_id = submit_prompt(
        7, SEEDANCE, "an owl at dusk", {"duration": "5"}, ledger_url=ledger_url
    )
    truths = fal_sim.control.ground_truth()
    assert len(truths) == 2
    assert fal_sim.control.health()["api_faults"]["lost_answer"] == 1
    first = truths[0]["request_id"]
    assert truths[1]["request_id"] == request_id
    assert truths[0]["tags"] == truths[1]["tags"]
    assert conn.execute("select count(*) as n from generations").fetchone()["n"] == 1
    conn.commit()

    report = _adopt(conn, fal_billing)
    assert (report.adoption.duplicates, report.adoption.duplicates_cancel_requested) == (1, 1)
    row = conn.execute("select * from generations where request_id = %s", [first]).fetchone()
    assert row["duplicate_of"] == request_id
    assert row["cancel_requested_at"] is not None
    item = conn.execute("select * from batch_items where id = %s", [row["batch_item_id"]])
    assert item.fetchone()["request_id"] == request_id  # the item keeps its own request
    assert fal_sim.control.wait_finished(first)["status"] == "canceled"
    conn.commit()
    _adopt(conn, fal_billing)  # the status pass reads the cancellation
    row = conn.execute("select * from generations where request_id = %s", [first]).fetchone()
    assert (row["status"], row["cost_micros"]) == ("canceled", 0)


def test_requests_with_no_tag_of_ours_are_orphans_until_explained(
    fal_sim: RunningSimulator,
    fal_billing: FalBilling,
    conn: psycopg.Connection,
    ledger_env: str,
) -> None:
    untagged = fal_client.submit(SEEDANCE, arguments=INPUTS).request_id
    foreign = fal_client.submit(
        SEEDANCE, arguments=INPUTS, headers={"X-Fal-Tags": "rq_item=999999,rq_user=7"}
    ).request_id
    report = _adopt(conn, fal_billing)
    assert report.adoption.orphans == 2
    assert report.adoption.unexplained_orphans == 2
    found = conn.execute("select request_id, reason from fal_orphan_requests").fetchall()
    reasons = {r["request_id"]: r["reason"] for r in found}
    assert "no rq_item tag" in reasons[untagged]
    assert "names no batch item" in reasons[foreign]
    conn.commit()

    def check() -> bool:
        return fal_orphans_are_explained(ledger=LedgerDatabase(url=ledger_env)).passed

    runner = CliRunner()
    listed = runner.invoke(main, ["orphans"])
    assert listed.exit_code == 1
    assert untagged in listed.output
    assert foreign in listed.output
    assert check() is False
    for request_id in (untagged, foreign):
        reason = "a notebook of the data team using the production key"
        done = runner.invoke(main, ["orphans", "explain", request_id, "--reason", reason])
        assert done.exit_code == 0, done.output
    assert runner.invoke(main, ["orphans"]).exit_code == 0
    assert check() is True
    again = _adopt(conn, fal_billing)  # recorded once, explained stays explained
    assert (again.adoption.orphans, again.adoption.unexplained_orphans) == (0, 0)


def test_resubmit_unknown_resends_only_what_fal_never_received(
    fal_sim: RunningSimulator,
    fal_billing: FalBilling,
    conn: psycopg.Connection,
    ledger_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # fal's own 500 enqueues and errs; the edge's 503 errs before enqueueing: both unknown
    monkeypatch.setattr(fal_client.client, "MAX_ATTEMPTS", 1)
    fal_sim.control.set_faults(api_500_rate=0.5, api_503_rate=0.5, seed=5)
    path = write_csv(tmp_path / "a.csv", prompts(8))
    first, _ = _submit(path, ledger_url, concurrency=1)
    assert first.report.counts["unknown"] == 8
    at_fal = {t["inputs"]["prompt"] for t in fal_sim.control.ground_truth()}
    assert 0 < len(at_fal) < 8
    fal_sim.control.set_faults(api_500_rate=0, api_503_rate=0)

    def broken() -> object:
        raise FalPlatformError("fal Platform API GET /models/requests/by-endpoint: HTTP 500")

    with pytest.raises(BatchConfigError, match="resubmit_unknown: fal's request list"):
        submit_file(
            path.as_uri(),
            BatchOptions(default_endpoint=SEEDANCE, resubmit_unknown=True),
            ledger_url=ledger_url,
            platform_factory=broken,
        )
    assert len(fal_sim.control.ground_truth()) == len(at_fal)  # nothing sent blind

    again, log = _submit(path, ledger_url, fal_billing, resubmit_unknown=True)
    assert again.report.counts["submitted"] == 8
    assert again.report.counts["unknown"] == 0
    assert any(f"{len(at_fal)} unknown items were at fal after all" in line for line in log)
    assert any(f"resubmitting {8 - len(at_fal)} items" in line for line in log)
    sent = [t["inputs"]["prompt"] for t in fal_sim.control.ground_truth()]
    assert sorted(sent) == sorted(r["prompt"] for r in prompts(8))  # each exactly once


def test_a_request_adopted_after_midnight_stays_in_the_month_it_was_sent(
    conn: psycopg.Connection,
) -> None:
    """One month definition: the item was claimed for sending at 23:59 on January 31st and
    adopted at 00:05 on February 1st: its generation (and its spend) is January's."""
    sent = dt.datetime(2027, 1, 31, 23, 59, tzinfo=dt.UTC)
    item = conn.execute(
        "insert into batch_items (idempotency_key, user_id, endpoint, inputs, state,"
        " estimate_micros, sent_at) values ('late-adopt', 7, %s,"
        ' \'{"prompt": "a fox", "duration": "5", "resolution": "720p"}\','
        " 'pending', 1517000, %s) returning id",
        (SEEDANCE, sent),
    ).fetchone()["id"]
    conn.execute("select set_config('renderqueue.now', '2027-02-01T00:05:00Z', false)")
    outcome = conn.execute(
        "select * from rq_adopt_fal_request(%s, %s, %s::jsonb)",
        ("req-late", SEEDANCE, f'{{"rq_item": "{item}", "rq_user": "7"}}'),
    ).fetchone()
    assert outcome["outcome"] == "adopted"
    row = conn.execute(
        "select created_at, cost_micros from generations where request_id = 'req-late'"
    ).fetchone()
    assert row["created_at"] == sent
    assert row["cost_micros"] == 1517000
