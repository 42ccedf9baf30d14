"""Per-user monthly budgets: checked before submit, held together across parallel batches."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from batch_helpers import SEEDANCE, micros, prompts, seedance_720p_micros, submit_file, write_csv

from renderqueue_pipeline.batch import (
    BatchOptions,
    BudgetExceeded,
    month_figures,
    parse_usd,
    set_budget,
    submit_prompt,
)
from renderqueue_pipeline.batch.budget import BudgetSettingError
from renderqueue_pipeline.simulator.testing import RunningSimulator

ROW = seedance_720p_micros(5)  # every test row: Seedance 720p, 5 s


def run(path: Path, ledger_url: str, **options):
    options.setdefault("default_endpoint", SEEDANCE)
    return submit_file(path.as_uri(), BatchOptions(**options), ledger_url=ledger_url)


def test_rows_past_the_monthly_budget_are_rejected_with_the_figures(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    # already this month: one finished generation and one still open
    set_budget(conn, 7, 5 * ROW + ROW // 2)
    submit_prompt(7, SEEDANCE, "earlier", {"duration": "5"}, ledger_url=ledger_url)
    figures = month_figures(conn, 7)
    assert (figures.actual_micros, figures.in_flight_micros) == (0, ROW)

    result = run(write_csv(tmp_path / "a.csv", prompts(8)), ledger_url)
    assert result.report.counts["submitted"] == 4  # 1 + 4 = 5 rows fit in 5.5
    assert result.report.counts["over_budget"] == 4
    first = result.report.rejections[0]
    assert first["field"] == "budget"
    assert first["reason"] == (
        "user 7 over the monthly budget $8.3435 for "
        f"{figures.month:%Y-%m}: spent $0.00 + in flight $7.585 + this row $1.517 = $9.102"
    )
    assert month_figures(conn, 7).in_flight_micros == 5 * ROW
    assert len(fal_sim.control.ground_truth()) == 5


def test_the_default_budget_applies_without_a_row(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    ledger_url: str,
    tmp_path: Path,
    settings_env: Callable[..., None],
) -> None:
    settings_env(RENDERQUEUE_DEFAULT_MONTHLY_BUDGET_USD="3.10")
    result = run(
        write_csv(tmp_path / "a.csv", prompts(3, user_id=None)), ledger_url, default_user_id=11
    )
    assert result.report.counts["submitted"] == 2
    assert result.report.counts["over_budget"] == 1
    assert "default budget $3.10" in result.report.rejections[0]["reason"]
    # a user's own row beats the default
    set_budget(conn, 11, 0)
    assert month_figures(conn, 11, default_limit_micros=micros("3.10")).limit_micros == 0


def test_no_budget_means_no_cap(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    result = run(write_csv(tmp_path / "a.csv", prompts(6)), ledger_url)
    assert result.report.counts["submitted"] == 6


def test_two_batches_at_once_never_exceed_the_budget_together(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    budget = 5 * ROW + ROW // 3
    set_budget(conn, 7, budget)
    fal_sim.control.set_faults(submit_latency=0.02)
    files = [write_csv(tmp_path / f"{n}.csv", prompts(20, tag=n)) for n in ("a", "b")]
    results: dict[str, object] = {}
    start = threading.Barrier(2)

    def one(path: Path) -> None:
        start.wait()
        # one chunk (one intent transaction) per file: without the user's lock both would
        # read the same month-to-date figures and admit 5 rows each
        results[path.stem] = run(path, ledger_url, concurrency=4, chunk_rows=20)

    threads = [threading.Thread(target=one, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    submitted = sum(r.report.counts["submitted"] for r in results.values())
    over = sum(r.report.counts["over_budget"] for r in results.values())
    assert (submitted, over) == (5, 35)
    committed = month_figures(conn, 7).committed_micros
    assert committed == 5 * ROW <= budget
    assert len(fal_sim.control.ground_truth()) == 5


def test_a_single_submission_over_budget_raises_and_sends_nothing(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str
) -> None:
    set_budget(conn, 3, ROW - 1)
    with pytest.raises(BudgetExceeded, match=r"this row \$1.517 = \$1.517"):
        submit_prompt(3, SEEDANCE, "a fox", {"duration": "5"}, ledger_url=ledger_url)
    assert fal_sim.control.ground_truth() == []
    assert conn.execute("select count(*) as n from batch_items").fetchone()["n"] == 0


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("abc", "expected an amount in USD"),
        ("-5", "must not be negative"),
        ("nan", "finite"),
        ("1e12", "at most"),
        ("0.0000001", "micro-dollar"),
        (None, "expected"),
    ],
)
def test_a_malformed_amount_names_the_setting(value, says: str) -> None:
    with pytest.raises(BudgetSettingError) as caught:
        parse_usd(value, "max_cost_usd")
    assert str(caught.value).startswith("max_cost_usd: ")
    assert says in str(caught.value)


def test_amounts_are_exact_micro_dollars() -> None:
    assert parse_usd("$12.50", "x") == 12_500_000
    assert parse_usd(0.1, "x") == 100_000
    assert parse_usd("1_000", "x") == 1_000_000_000
