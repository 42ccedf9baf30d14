"""Prompt files that are broken, change under us, or hold unusual types; runs that die; a
wrong FAL_KEY. Each is refused whole before the first request, rejected row by row with
its line, or stops with the rows left unsent: never half-submitted, never left `open`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from batch_helpers import SEEDANCE, items, ledger_counts, prompts, submit_file, write_csv
from click.testing import CliRunner

import renderqueue_pipeline.batch.submit as submit_module
from renderqueue_pipeline.batch import BatchOptions, BatchStopped
from renderqueue_pipeline.batch.source import CSV_FIELD_LIMIT, PromptFileError
from renderqueue_pipeline.cli import main
from renderqueue_pipeline.simulator.testing import RunningSimulator


def submit(path: Path, ledger_url: str, **options: Any) -> Any:
    options.setdefault("default_endpoint", SEEDANCE)
    options.setdefault("concurrency", 4)
    return submit_file(path.as_uri(), BatchOptions(**options), ledger_url=ledger_url)


def fal_prompts(sim: RunningSimulator) -> list[str]:
    return sorted(t["inputs"]["prompt"] for t in sim.control.ground_truth())


def _rows(n: int, tag: str) -> str:
    return "".join(f"{tag} {i},7,5\n" for i in range(n))


@pytest.mark.parametrize("tail_bytes", [0, 2 << 20], ids=["near-the-end", "1-MiB-after"])
def test_a_csv_with_an_unterminated_quote_is_refused_whole_with_its_line(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    ledger_url: str,
    tmp_path: Path,
    tail_bytes: int,
) -> None:
    text = "prompt,user_id,duration\n" + _rows(300, "good")
    text += '"a fox that never ends,7,5\n' + _rows(3, "after")
    text += "x" * tail_bytes
    path = tmp_path / "open-quote.csv"
    path.write_text(text)
    for _ in range(2):  # and the same again on a re-run
        with pytest.raises(PromptFileError, match=r"line 302: the file cannot be parsed"):
            submit(path, ledger_url)
        assert ledger_counts(conn) == (0, 0, 0)
        assert fal_sim.control.ground_truth() == []


def test_an_oversized_field_is_a_row_error_and_the_rows_after_it_are_submitted(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    huge = "y" * (CSV_FIELD_LIMIT + 10)
    text = "prompt,user_id,duration\nfirst,7,5\n" + f'"{huge}",7,5\n' + "last,7,5\n"
    path = tmp_path / "huge.csv"
    path.write_text(text)
    result = submit(path, ledger_url)
    assert result.report.status == "done"
    assert result.report.counts["submitted"] == 2
    [rejected] = [i for i in items(conn) if i["state"] == "rejected"]
    assert (rejected["line_no"], rejected["reject_field"]) == (3, "prompt")
    assert fal_prompts(fal_sim) == ["first", "last"]


def test_rows_shorter_than_the_header_are_rejected_with_their_line(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "short.csv"
    path.write_text("prompt,user_id,duration\nfull,7,5\nshort,7\nalso full,7,5\n")
    result = submit(path, ledger_url)
    assert result.report.counts["submitted"] == 2
    [rejected] = [i for i in items(conn) if i["state"] == "rejected"]
    assert rejected["line_no"] == 3
    assert "2 fields but the header has 3" in rejected["reason"]


def test_a_file_that_changes_between_hashing_and_reading_submits_what_was_hashed(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    ledger_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write_csv(tmp_path / "live.csv", prompts(3, tag="first"))
    real_inspect = submit_module.inspect_file

    def inspect_then_overwrite(*args: Any, **kwargs: Any) -> Any:
        facts = real_inspect(*args, **kwargs)
        write_csv(path, prompts(3, tag="second"))  # an upload lands right after the hash
        return facts

    monkeypatch.setattr(submit_module, "inspect_file", inspect_then_overwrite)
    first = submit(path, ledger_url)
    monkeypatch.undo()
    second = submit(path, ledger_url)  # the new content: a new batch
    assert first.batch_id != second.batch_id
    sent = fal_prompts(fal_sim)
    assert len(sent) == len(set(sent)) == 6  # nothing submitted twice
    assert sorted(i["inputs"]["prompt"] for i in items(conn, first.batch_id)) == [
        f"first {i}: a red fox in fresh snow" for i in range(3)
    ]


def test_parquet_decimal_and_other_arrow_types_convert_per_row(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:

    table = pa.table(
        {
            "prompt": ["a", "b", "c"],
            "user_id": pa.array([Decimal("7"), Decimal("8"), Decimal("9")], pa.decimal128(10, 0)),
            "duration": pa.array(
                [Decimal("5"), Decimal("4.0"), Decimal("4.5")], pa.decimal128(4, 1)
            ),
            "seed": pa.array([1, 2, 3], pa.uint16()),
            "shot_at": pa.array([dt.date(2026, 1, 2)] * 3, pa.date32()),
        }
    )
    path = tmp_path / "typed.parquet"
    pq.write_table(table, path)
    result = submit(path, ledger_url)
    assert result.report.status == "done"
    by_line = {i["line_no"]: i for i in items(conn)}
    assert by_line[1]["state"] == by_line[2]["state"] == "submitted"
    assert by_line[1]["user_id"] == 7
    assert by_line[1]["inputs"]["duration"] == "5"
    assert by_line[2]["inputs"]["shot_at"] == "2026-01-02"
    assert by_line[3]["state"] == "rejected"  # 4.5 s is not a duration Seedance offers


class _DyingGateway:
    """The run dies inside (a fault of our own process, not of fal)."""

    def __init__(self, concurrency: int) -> None:
        pass

    async def __aenter__(self) -> _DyingGateway:
        raise RuntimeError("the worker's memory ran out")

    async def __aexit__(self, *exc: Any) -> None:
        return None


def test_a_batch_whose_run_died_is_marked_failed_with_the_reason_not_left_open(
    conn: psycopg.Connection, ledger_url: str, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "a.csv", prompts(3))
    with pytest.raises(RuntimeError):
        submit_file(
            path.as_uri(),
            BatchOptions(default_endpoint=SEEDANCE),
            ledger_url=ledger_url,
            gateway_factory=_DyingGateway,
        )
    batch = conn.execute("select status, error from batches").fetchone()
    assert batch["status"] == "failed"
    assert "RuntimeError: the worker's memory ran out" in batch["error"]


def test_a_wrong_fal_key_stops_the_batch_and_leaves_its_rows_unsent(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    ledger_env: str,
    tmp_path: Path,
    settings_env: Callable[..., None],
) -> None:
    fal_sim.control.set_faults(fal_key="the-right-key")
    settings_env(FAL_KEY="a-wrong-key-1234")  # dropped at the end: later tests get fal_sim's
    path = write_csv(tmp_path / "a.csv", prompts(12))
    with pytest.raises(BatchStopped) as caught:
        submit(path, ledger_env, concurrency=8)
    assert "FAL_KEY" in str(caught.value)
    assert "a-wrong-key-1234" not in str(caught.value)
    assert [i for i in items(conn) if i["state"] in ("rejected", "unknown")] == []
    assert fal_sim.control.ground_truth() == []
    batch = conn.execute("select status, error from batches").fetchone()
    assert batch["status"] == "failed"
    assert "FAL_KEY" in batch["error"]

    settings_env(FAL_KEY="the-right-key")
    resumed = submit(path, ledger_env, concurrency=8)
    assert resumed.report.counts["submitted"] == 12
    assert len(fal_sim.control.ground_truth()) == 12


def test_cli_paths_with_spaces_and_brackets_are_found(
    fal_sim: RunningSimulator, conn: psycopg.Connection, ledger_env: str, tmp_path: Path
) -> None:
    folder = tmp_path / "team prompts [v2]"
    folder.mkdir()
    path = write_csv(folder / "week 48 [final].csv", prompts(2))
    result = CliRunner().invoke(main, ["batch", "submit", str(path), "--endpoint", SEEDANCE])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"batch 1: file://{path}"
    assert "submitted   2" in result.stdout
