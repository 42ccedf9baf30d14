"""Batch work yields and users take turns: priority, round-robin by user, the queued bound.

All against the fal simulator (its ground truth shows what fal saw, in arrival order) and
the real ledger; the bound test also runs the real webhook receiver, whose deliveries are
what lets the fan-out go on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from batch_helpers import SEEDANCE, prompts, submit_file, write_csv

from renderqueue_pipeline.batch import BatchOptions, BatchResult
from renderqueue_pipeline.batch.single import submit_prompt
from renderqueue_pipeline.simulator.testing import RunningSimulator

pytestmark = pytest.mark.timeout(180)


def submit(path: Path, ledger_url: str, **options) -> BatchResult:
    options.setdefault("default_endpoint", SEEDANCE)
    return submit_file(path.as_uri(), BatchOptions(**options), ledger_url=ledger_url)


def arrivals(sim: RunningSimulator) -> list[dict]:
    """Every request fal was given, in the order it arrived."""
    return sorted(sim.control.ground_truth(), key=lambda t: t["index"])


@pytest.fixture
def max_queued(settings_env: Callable[..., None]) -> None:
    settings_env(RENDERQUEUE_FAL_MAX_QUEUED="3")


def test_batch_requests_go_at_low_priority_and_a_single_submit_at_normal(
    fal_sim: RunningSimulator, ledger_url: str, tmp_path: Path
) -> None:
    submit(write_csv(tmp_path / "batch.csv", prompts(3, tag="batch")), ledger_url)
    submit(
        write_csv(tmp_path / "urgent.csv", prompts(2, tag="urgent")),
        ledger_url,
        priority="normal",
    )
    submit_prompt(7, SEEDANCE, "single", {"duration": "5"}, ledger_url=ledger_url)
    seen = {t["inputs"]["prompt"].split(" ")[0]: t["priority"] for t in arrivals(fal_sim)}
    assert seen == {"batch": "low", "urgent": "normal", "single": "normal"}


def test_a_small_users_rows_are_sent_among_the_first_not_after_a_big_users(
    fal_sim: RunningSimulator, ledger_url: str, tmp_path: Path
) -> None:
    rows = prompts(40, user_id=101, tag="big") + prompts(6, user_id=202, tag="small")
    result = submit(write_csv(tmp_path / "two-users.csv", rows), ledger_url, concurrency=1)
    assert result.report.counts["submitted"] == 46
    order = [t["inputs"]["prompt"].split(" ")[0] for t in arrivals(fal_sim)]
    small_positions = [i for i, who in enumerate(order) if who == "small"]
    assert max(small_positions) < 15, order
    assert order[:12] == ["big", "small"] * 6  # users take turns
    # inside one user, the file's order is kept
    big = [t["inputs"]["prompt"] for t in arrivals(fal_sim) if t["inputs"]["prompt"][:3] == "big"]
    assert [int(p.split(" ")[1].rstrip(":")) for p in big] == list(range(40))


def test_the_fan_out_pauses_at_the_queued_bound_and_resumes_as_fal_finishes(
    fal_sim: RunningSimulator,
    webhook_url: str,
    max_queued: None,
    ledger_url: str,
    tmp_path: Path,
) -> None:
    fal_sim.control.set_faults(concurrency_limit=1, queue_delay="0", run_time="0.3")
    result = submit(write_csv(tmp_path / "bounded.csv", prompts(10)), ledger_url, concurrency=8)
    assert result.report.counts["submitted"] == 10  # it resumed every time, to the end
    truth = arrivals(fal_sim)
    for entry in truth:  # when each arrived, how many of ours were waiting at fal
        at = entry["submitted_at"]
        waiting = [t for t in truth if t["submitted_at"] <= at and (t["finished_at"] or 1e12) > at]
        assert len(waiting) <= 3, (entry["index"], len(waiting))
    assert result.stats.waited_for_fal_queue > 0  # it did pause
    fal_sim.control.set_faults(concurrency_limit=None)
