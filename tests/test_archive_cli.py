"""`renderqueue archive [--limit N]` from a shell."""

from __future__ import annotations

import pytest
from archive_helpers import Behaviour, completed_row, media_server, row, video
from click.testing import CliRunner

from renderqueue_pipeline.cli import main


@pytest.fixture
def origin():
    with media_server("127.0.0.1") as server:
        yield server


def test_renderqueue_archive_takes_at_most_limit_rows_and_says_what_it_did(
    conn, ledger_env, origin, tmp_path, settings_env
) -> None:

    settings_env(
        RENDERQUEUE_STORAGE_URL=f"file://{tmp_path / 'cli-archive'}",
        RENDERQUEUE_ARCHIVE_LOOPBACK_HOSTS=origin.netloc,
    )
    first = completed_row(conn, video(origin.serve("/1.mp4", Behaviour(size=1000)), 1000))
    second = completed_row(conn, video(origin.serve("/2.mp4", Behaviour(status=404)), 1000))

    result = CliRunner().invoke(main, ["archive", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert "archived 1, lost 0, failed 0, retrying 0; 1000 bytes" in result.output
    assert first in result.output
    assert row(conn, first)["archive_status"] == "archived"
    assert row(conn, second)["archive_status"] == "pending"

    result = CliRunner().invoke(main, ["archive"])
    assert result.exit_code == 0, result.output
    assert "archived 0, lost 1" in result.output
    assert "gone: 1" in result.output
    assert row(conn, second)["archive_status"] == "lost"

    bad = CliRunner().invoke(main, ["archive", "--limit", "0"])
    assert bad.exit_code == 2
    assert "--limit" in bad.output
