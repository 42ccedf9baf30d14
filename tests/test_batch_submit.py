"""Batch submission end to end: prompt files through the gateway to the fal simulator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import fal_client.client
import psycopg
import pytest
from batch_helpers import (
    SEEDANCE,
    SEEDANCE_FAST,
    items,
    ledger_counts,
    prompts,
    seedance_720p_micros,
    submit_file,
    write_csv,
    write_jsonl,
    write_parquet,
)
from spend_helpers import FalBilling

from renderqueue_pipeline.batch import BatchOptions, BatchResult
from renderqueue_pipeline.batch.source import PromptFileError
from renderqueue_pipeline.simulator.testing import RunningSimulator, wait_until


@dataclass
class Submitted:
    """A run's result and the lines it logged."""

    result: BatchResult
    log: list[str]

    def __getattr__(self, name: str):
        return getattr(self.result, name)


def submit(path: Path | str, ledger_url: str, platform_factory=None, **options) -> Submitted:
    options.setdefault("default_endpoint", SEEDANCE)
    options.setdefault("concurrency", 8)
    log: list[str] = []
    result = submit_file(
        path.as_uri() if isinstance(path, Path) else path,
        BatchOptions(**options),
        ledger_url=ledger_url,
        log=log.append,
        platform_factory=platform_factory,
    )
    return Submitted(result, log)


def fal_prompts(sim: RunningSimulator) -> list[str]:
    """The prompt of every request the simulator was given."""
    return [truth["inputs"]["prompt"] for truth in sim.control.ground_truth()]


def test_good_rows_are_submitted_and_bad_rows_rejected_with_line_and_field(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    rows = prompts(6)
    rows[1]["user_id"] = "seven"  # line 3
    rows[2]["prompt"] = "x" * 20_000  # line 4
    rows[3]["duration"] = "-5"  # line 5: the ledger refuses it
    rows[4]["duration"] = "40"  # line 6: priced, but fal's model refuses it (422)
    rows.append({"prompt": "an owl", "user_id": 7, "duration": "5", "endpoint": "acme/nope/t2v"})
    result = submit(write_csv(tmp_path / "week48.csv", rows), ledger_url)

    counts = result.report.counts
    assert (counts["read"], counts["submitted"], counts["rejected"]) == (7, 2, 5)
    assert (counts["over_budget"], counts["unknown"], counts["pending"]) == (0, 0, 0)
    rejected = {r["line_no"]: (r["field"], r["reason"]) for r in result.report.rejections}
    assert rejected[3] == ("user_id", "expected an integer, got 'seven'")
    assert rejected[4][0] == "prompt"
    assert "20,000 characters" in rejected[4][1]
    assert rejected[5][0] == "duration"
    assert "positive" in rejected[5][1]
    assert rejected[6][0] == "duration"
    assert "HTTP 422" in rejected[6][1]
    assert rejected[8][0] == "endpoint"
    assert "no price for 'acme/nope/t2v'" in rejected[8][1]

    table = result.report.rejections_markdown()
    assert table.splitlines()[0] == "| line | field | reason |"
    assert "| 3 | user_id | expected an integer, got 'seven' |" in table

    # every submitted item has its generation row, fal has exactly those requests
    submitted = [i for i in items(conn, result.batch_id) if i["state"] == "submitted"]
    truth = {t["request_id"] for t in fal_sim.control.ground_truth()}
    assert {i["request_id"] for i in submitted} == truth
    assert len(truth) == 2
    generations = conn.execute(
        "select request_id, user_id, cost_micros, fal_expires_at from generations"
    ).fetchall()
    # the gateway asked fal for a lifecycle: the ledger knows when fal deletes the outputs
    assert all(g["fal_expires_at"] is not None for g in generations)
    assert sorted(g["request_id"] for g in generations) == sorted(
        i["request_id"] for i in submitted
    )
    assert all(g["cost_micros"] == seedance_720p_micros(5) for g in generations)
    assert result.report.submitted_estimate_micros == 2 * seedance_720p_micros(5)


def test_jsonl_and_parquet_files_submit_the_same_way(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    jsonl = submit(write_jsonl(tmp_path / "a.jsonl", prompts(5, tag="j")), ledger_url)
    parquet = submit(write_parquet(tmp_path / "b.parquet", prompts(9, tag="q")), ledger_url)
    assert jsonl.report.counts["submitted"] == 5
    assert parquet.report.counts["submitted"] == 9
    assert len(fal_sim.control.ground_truth()) == 14


def test_the_same_content_under_another_name_submits_nothing(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    first = write_csv(tmp_path / "a.csv", prompts(4))
    submit(first, ledger_url)
    renamed = tmp_path / "renamed.csv"
    first.rename(renamed)
    again = submit(renamed, ledger_url)
    assert again.duplicate
    assert again.batch_id == 1
    assert any("already ingested as batch 1" in line for line in again.log)
    assert len(fal_sim.control.ground_truth()) == 4
    assert ledger_counts(conn) == (1, 4, 4)


def test_a_batch_cap_rejects_rows_past_max_cost(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    row_cost = seedance_720p_micros(5)
    result = submit(
        write_csv(tmp_path / "a.csv", prompts(10)),
        ledger_url,
        max_cost_micros=3 * row_cost + row_cost // 2,  # room for 3.5 rows
    )
    assert result.report.counts["submitted"] == 3
    assert result.report.counts["over_budget"] == 7
    first = result.report.rejections[0]
    assert first["field"] == "max_cost_usd"
    assert "$5.3095" in first["reason"]
    assert "$4.551 + this row $1.517 = $6.068" in first["reason"]


def test_a_429_slows_the_fan_out_and_no_row_fails(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    ledger_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    # fal-client retries a 429 ten times by itself (about 30 s); one attempt shows ours
    monkeypatch.setattr(fal_client.client, "MAX_ATTEMPTS", 1)
    fal_sim.control.set_faults(api_429_rate=0.4)
    result = submit(write_csv(tmp_path / "a.csv", prompts(30)), ledger_url, concurrency=8)
    assert result.report.counts["submitted"] == 30
    assert result.report.counts["rejected"] == 0
    assert result.stats.rate_limited > 0
    assert result.stats.lowest_concurrency < 8
    assert any("fal answered 429: slowing down" in line for line in result.log)
    assert sorted(fal_prompts(fal_sim)) == sorted(r["prompt"] for r in prompts(30))


def test_progress_is_logged_with_rate_and_eta(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    fal_sim.control.set_faults(submit_latency=0.05)
    result = submit(
        write_csv(tmp_path / "a.csv", prompts(40)), ledger_url, concurrency=2, progress_seconds=0.2
    )
    progress = [line for line in result.log if "rows/s" in line]
    assert len(progress) >= 3
    assert "/~40 rows" in progress[0]
    assert "ETA" in progress[0]
    assert "40/~40 rows (100%), 40 submitted" in progress[-1]


def test_a_crash_between_intent_and_answer_is_unknown_and_never_sent_twice(
    fal_sim: RunningSimulator,
    fal_billing: FalBilling,
    conn: psycopg.Connection,
    ledger_url: str,
    tmp_path: Path,
) -> None:
    """Kill a real `renderqueue batch submit` while fal holds its requests, then re-run."""
    fal_sim.control.set_faults(submit_latency=30)  # fal enqueues, then answers in 30 s
    path = write_csv(tmp_path / "a.csv", prompts(12))
    env = {**os.environ, "DATABASE_URL": ledger_url, "RENDERQUEUE_HOME": str(tmp_path / "home")}
    command = [
        sys.executable,
        "-m",
        "renderqueue_pipeline.cli",
        "batch",
        "submit",
        str(path),
        "--endpoint",
        SEEDANCE,
        "--concurrency",
        "4",
    ]
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: len(fal_sim.control.ground_truth()) == 4, timeout=60)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # every row has its intent; the four being sent are marked sent, the rest are not
    pending = [i for i in items(conn) if i["state"] == "pending"]
    assert len(pending) == 12
    in_flight = sorted(i["line_no"] for i in pending if i["sent_at"] is not None)
    assert len(in_flight) == 4

    fal_sim.control.set_faults(submit_latency=0)
    rerun = submit(path, ledger_url, concurrency=4)
    counts = rerun.report.counts
    assert (counts["read"], counts["submitted"], counts["unknown"]) == (12, 8, 4)
    assert [u["line_no"] for u in rerun.report.unknown] == in_flight
    assert any("4 items of batch 1 were left by a run" in line for line in rerun.log)
    # the run's table names each unknown line (its first cell), whichever lines they were
    table = rerun.report.unknown_markdown().splitlines()[2:]
    assert [int(line.split("|")[1]) for line in table] == in_flight
    # the four fal already had were not sent again; nothing was sent twice
    sent = fal_prompts(fal_sim)
    assert len(sent) == len(set(sent)) == 12

    # a third run does nothing; resubmit_unknown reads fal's request list first: fal has
    # all four, so they are adopted (and it says so), and none is sent again
    assert submit(path, ledger_url).duplicate
    resubmitted = submit(
        path, ledger_url, resubmit_unknown=True, platform_factory=fal_billing.platform
    )
    assert resubmitted.report.counts["submitted"] == 12
    assert resubmitted.report.counts["unknown"] == 0
    assert any("4 unknown items were at fal after all" in line for line in resubmitted.log)
    assert not any("resubmitting" in line for line in resubmitted.log)
    assert len(fal_sim.control.ground_truth()) == 12


def test_a_file_error_writes_nothing(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "photo.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00")
    with pytest.raises(PromptFileError, match="not a text file"):
        submit(path, ledger_url)
    assert ledger_counts(conn) == (0, 0, 0)
    assert fal_sim.control.ground_truth() == []


def test_rows_with_their_own_endpoint_and_user(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    rows = [
        {"prompt": "a", "user_id": 1, "endpoint": SEEDANCE_FAST, "resolution": "480p"},
        {"prompt": "b", "user_id": 2, "endpoint": "", "resolution": ""},
    ]
    result = submit(
        write_csv(tmp_path / "a.csv", rows),
        ledger_url,
        default_inputs={"duration": "4", "resolution": "720p"},
    )
    assert result.report.counts["submitted"] == 2
    got = {
        g["user_id"]: (g["endpoint"], g["inputs"])
        for g in conn.execute("select user_id, endpoint, inputs from generations")
    }
    assert got[1] == (SEEDANCE_FAST, {"prompt": "a", "duration": "4", "resolution": "480p"})
    assert got[2] == (SEEDANCE, {"prompt": "b", "duration": "4", "resolution": "720p"})
