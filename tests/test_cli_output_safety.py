"""The CLI prints data as data: rich markup in a source, a URL or a file name is shown
literally and crashes nothing; every --month gets a clear error, never a traceback."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from archive_helpers import Behaviour, completed_row, media_server, row, video
from click.testing import CliRunner
from report_helpers import KLING, KLING_MICROS_PER_SECOND, add_batch, add_generation, add_item

from renderqueue_pipeline.cli import main
from renderqueue_pipeline.ledger.report import print_ledger_status


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_report_by_batch_shows_sources_with_markup_literally(
    conn: psycopg.Connection, ledger_env: str
) -> None:
    created = dt.datetime(2026, 3, 5, tzinfo=dt.UTC)
    for source in ("file:///inbox/a[/x].csv", "file:///inbox/[red]week.csv"):
        batch = add_batch(conn, source)
        add_generation(
            conn,
            created_at=created,
            status="completed",
            user_id=1,
            endpoint=KLING,
            seconds=5,
            cost_micros=5 * KLING_MICROS_PER_SECOND,
            batch_item_id=add_item(conn, batch, 5 * KLING_MICROS_PER_SECOND),
        )
    conn.commit()
    result = CliRunner(env={"COLUMNS": "250"}).invoke(
        main, ["report", "--month", "2026-03", "--by", "batch"]
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 0
    assert "file:///inbox/a[/x].csv" in result.stdout
    assert "file:///inbox/[red]week.csv" in result.stdout


def test_archive_prints_an_output_url_with_markup_and_leaves_no_row_leased(
    conn: psycopg.Connection,
    ledger_env: str,
    archive_root: Path,
    settings_env: Callable[..., None],
) -> None:

    with media_server("127.0.0.1") as origin:
        settings_env(RENDERQUEUE_ARCHIVE_LOOPBACK_HOSTS=origin.netloc)
        gone = [
            completed_row(conn, video(origin.serve(f"/{i}[/x].mp4", Behaviour(status=404)), 1000))
            for i in range(3)
        ]
        result = invoke("archive")
    assert result.exit_code == 0, result.output
    assert "archived 0, lost 3" in result.stdout
    assert "[/x]" in result.stderr
    assert {row(conn, r)["archive_status"] for r in gone} == {"lost"}


def test_ledger_status_shows_an_endpoint_with_markup_literally(
    conn: psycopg.Connection, ledger_env: str, capsys: pytest.CaptureFixture
) -> None:
    add_generation(
        conn,
        created_at=dt.datetime(2026, 3, 5, tzinfo=dt.UTC),
        status="completed",
        user_id=1,
        endpoint="acme/[red]app/[/x]",
        seconds=5,
        cost_micros=1,
        batch_item_id=None,
    )
    conn.commit()
    print_ledger_status(ledger_env)
    assert "acme/[red]app/[/x]" in "".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "args",
    [
        ["report", "--month", "0000-01"],
        ["report", "--month", "9999-12"],
        ["budget", "set", "--user-id", "1", "--usd", "5", "--month", "0000-01"],
        ["budget", "show", "--month", "0000-01"],
        ["budget", "show", "--month", "9999-12"],
        ["spend", "reconcile", "--month", "0000-01", "--no-load"],
        ["spend", "reconcile", "--month", "9999-12", "--no-load"],
    ],
    ids=lambda a: " ".join(a[:2] + a[-1:]),
)
def test_every_month_option_gives_a_clear_error_for_an_impossible_month(
    conn: psycopg.Connection, ledger_env: str, args: list[str]
) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("renderqueue: ")
    assert "month" in result.stderr
    assert result.stderr.count("\n") == 1
