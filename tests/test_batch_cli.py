"""`renderqueue batch ...`, `renderqueue budget ...` and `renderqueue submit`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from batch_helpers import SEEDANCE, prompts, seedance_720p_micros, write_csv
from click.testing import CliRunner

from renderqueue_pipeline.cli import main
from renderqueue_pipeline.money import usd
from renderqueue_pipeline.simulator.testing import RunningSimulator


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_batch_submit_prints_the_batch_and_its_counts_then_show_repeats_them(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_env: str, tmp_path: Path
) -> None:
    rows = prompts(4, user_id=None)
    rows[1]["duration"] = "-1"
    path = write_csv(tmp_path / "a.csv", rows)
    code, out, err = cli(
        "batch",
        "submit",
        str(path),
        "--user-id",
        "9",
        "--endpoint",
        SEEDANCE,
        "--input",
        "resolution=720p",
        "--concurrency",
        "3",
    )
    assert code == 0, err
    assert out.splitlines()[0] == f"batch 1: {path.as_uri()}"
    assert "  submitted   3" in out
    assert "  rejected    1" in out
    assert "     3  duration       must be positive, got " in out
    assert "rows/s" in err  # the final progress line

    code, shown, _ = cli("batch", "show", "1")
    assert code == 0
    assert shown == out
    code, listed, _ = cli("batch", "list")
    assert "done" in listed
    assert "3 submitted" in listed

    # the same file again: nothing submitted, and the exit status says so
    code, _, err = cli("batch", "submit", str(path), "--endpoint", SEEDANCE)
    assert code == 1
    assert "nothing submitted: this content is batch 1" in err


def test_batch_submit_exits_non_zero_when_no_row_could_be_submitted(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_env: str, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "a.csv", prompts(2, user_id=None))
    code, out, err = cli("batch", "submit", str(path), "--endpoint", SEEDANCE)
    assert code == 1
    assert "no default user" in out
    assert "nothing could be submitted" in err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--max-cost-usd", "ten"], "renderqueue: --max-cost-usd: expected an amount in USD"),
        (["--max-cost-usd", "-1"], "renderqueue: --max-cost-usd: must not be negative"),
        (["--concurrency", "0"], "renderqueue: concurrency: must be between 1 and 256"),
        (["--user-id", "x"], "'x' is not a valid integer"),
        (["--input", "duration"], "expected KEY=VALUE"),
    ],
)
def test_batch_submit_names_a_bad_setting(
    conn: psycopg.Connection, ledger_env: str, tmp_path: Path, args: list[str], says: str
) -> None:
    path = write_csv(tmp_path / "a.csv", prompts(1))
    code, _, err = cli("batch", "submit", str(path), "--endpoint", SEEDANCE, *args)
    assert code == 2
    assert says in err
    assert conn.execute("select count(*) as n from batches").fetchone()["n"] == 0


def test_file_errors_are_one_line(
    conn: psycopg.Connection, ledger_env: str, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    code, _, err = cli("batch", "submit", str(empty), "--endpoint", SEEDANCE)
    assert (code, err) == (2, f"renderqueue: {empty.as_uri()}: the file is empty\n")
    code, _, err = cli("batch", "show", "42")
    assert code == 2
    assert "no batch 42" in err


def test_budget_set_and_show(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_env: str
) -> None:
    code, out, _ = cli("budget", "set", "--user-id", "7", "--usd", "20", "--month", "2031-02")
    assert code == 0
    assert out == "user 7: $20.00 for 2031-02\n"
    code, out, _ = cli("budget", "set", "--user-id", "7", "--usd", "12.5")
    assert code == 0
    assert out.startswith("user 7: $12.50 for ")
    code, _request_id, _ = cli(
        "submit",
        "--user-id",
        "7",
        "--endpoint",
        SEEDANCE,
        "--prompt",
        "a fox",
        "--input",
        "duration=5",
    )
    assert code == 0
    code, out, _ = cli("budget", "show", "--user-id", "7")
    row = out.splitlines()[1].split()
    remaining = 12_500_000 - seedance_720p_micros(5)
    assert row == ["7", row[1], "$12.50", "$0.00", usd(seedance_720p_micros(5)), usd(remaining)]
    code, out, _ = cli("budget", "show", "--month", "2031-02")
    assert out.splitlines()[1].split()[:3] == ["7", "2031-02", "$20.00"]

    code, _, err = cli("budget", "set", "--user-id", "7", "--usd", "lots")
    assert code == 2
    assert "--usd: expected an amount in USD" in err
    code, _, err = cli("budget", "set", "--user-id", "7", "--usd", "5", "--month", "2031-13")
    assert code == 2
    assert "--month: expected YYYY-MM" in err


def test_submit_prints_the_request_id(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_env: str
) -> None:
    code, out, err = cli(
        "submit",
        "--user-id",
        "3",
        "--endpoint",
        SEEDANCE,
        "--prompt",
        "an owl",
        "--input",
        "duration=6",
        "--input",
        "generate_audio=false",
        "--idempotency-key",
        "order-1",
    )
    assert code == 0, err
    request_id = out.strip()
    truth = fal_sim.control.ground_truth(request_id)
    assert truth["inputs"] == {"prompt": "an owl", "duration": "6", "generate_audio": False}
    row = conn.execute("select user_id, cost_micros from generations").fetchone()
    assert (row["user_id"], row["cost_micros"]) == (3, seedance_720p_micros(6))
    # the same idempotency key: the same request, not a second one
    code, again, _ = cli(
        "submit",
        "--user-id",
        "3",
        "--endpoint",
        SEEDANCE,
        "--prompt",
        "an owl",
        "--input",
        "duration=6",
        "--input",
        "generate_audio=false",
        "--idempotency-key",
        "order-1",
    )
    assert again == out
    assert len(fal_sim.control.ground_truth()) == 1

    code, _, err = cli("submit", "--user-id", "3", "--endpoint", "acme/x/y", "--prompt", "a")
    assert code == 2
    assert err.startswith("renderqueue: endpoint: no price for 'acme/x/y'")


def test_fal_commands_need_a_key(
    conn: psycopg.Connection, ledger_env: str, settings_env: Callable[..., None], tmp_path: Path
) -> None:

    settings_env(FAL_KEY=None)
    code, _, err = cli("submit", "--user-id", "3", "--endpoint", SEEDANCE, "--prompt", "a")
    assert code == 2
    assert "FAL_KEY is not set" in err
