"""Prompt sources are allow-listed before anything is opened: the inbox, prefixes in
RENDERQUEUE_PROMPT_SOURCES, and local paths for the CLI only. A canary HTTP server on
127.0.0.2 must see no request at all, whatever URL form is tried."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from batch_helpers import SEEDANCE, dagster_instance, ledger_counts, prompts, write_csv
from click.testing import CliRunner

from renderqueue_pipeline.batch import PromptFileError
from renderqueue_pipeline.batch.source import check_source, file_format
from renderqueue_pipeline.cli import main
from renderqueue_pipeline.defs.batch.jobs import submit_batch
from renderqueue_pipeline.defs.batch.resources import PromptsInbox
from renderqueue_pipeline.defs.resources import LedgerDatabase, fal_connection
from renderqueue_pipeline.simulator.testing import RunningSimulator


class _Canary(BaseHTTPRequestHandler):
    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(self.path)
        body = b"prompt\nTOKEN-canary-line\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def canary() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.2 (port 0) recording every path asked for."""
    seen: list[str] = []
    handler = type("Canary", (_Canary,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.2", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.2:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_the_cli_refuses_urls_outside_the_allow_list_before_fetching_anything(
    conn: psycopg.Connection, ledger_env: str, canary: tuple[str, list[str]]
) -> None:
    base, seen = canary
    for url in (
        f"{base}/latest/token.csv",
        f"{base}/x#y.csv",
        f"{base}/x?y.csv",
        f"{base}/inbox/../latest/token.csv",
    ):
        code, out, err = cli("batch", "submit", url, "--endpoint", SEEDANCE, "--user-id", "1")
        assert code == 2, (url, out, err)
        assert "TOKEN-canary-line" not in out + err
        assert "not an allowed prompt source" in err or "must not" in err or "file type" in err
    assert seen == []
    assert ledger_counts(conn) == (0, 0, 0)


def test_a_listed_prefix_is_no_licence_for_its_neighbours(
    ledger_env: str, canary: tuple[str, list[str]], settings_env: Callable[..., None]
) -> None:

    base, seen = canary
    settings_env(RENDERQUEUE_PROMPT_SOURCES=f"{base}/prompts, s3://team-bucket/in/")
    prefixes = [f"{base}/prompts", "s3://team-bucket/in/"]
    check_source(f"{base}/prompts/week.csv", prefixes, allow_local=False)
    check_source("s3://team-bucket/in/sub/week.csv", prefixes, allow_local=False)
    for url in (
        f"{base}/prompts-private/week.csv",  # a sibling sharing the prefix's letters
        f"{base}/prompts/../admin/week.csv",
        f"http://user:pw@{base.removeprefix('http://')}/prompts/week.csv",
        "s3://team-bucket/other/week.csv",
        "s3://team-bucket-2/in/week.csv",
        "file:///etc/prompts.csv",
        "/etc/prompts.csv",
    ):
        with pytest.raises(PromptFileError):
            check_source(url, prefixes, allow_local=False)
    assert seen == []


def test_a_fragment_or_query_does_not_make_a_name_a_csv() -> None:
    for url in ("http://127.0.0.2/x#y.csv", "http://127.0.0.2/x?name=y.csv"):
        with pytest.raises(PromptFileError, match="unsupported file type"):
            file_format(url)
    assert file_format("file:///tmp/a b [v2].csv") == "csv"


def test_the_launchpad_may_name_only_the_inbox_or_an_allowed_prefix(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    ledger_url: str,
    tmp_path: Path,
    canary: tuple[str, list[str]],
    dagster_storage: str,
) -> None:
    base, seen = canary
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    outside = write_csv(tmp_path / "outside.csv", prompts(2))
    inside = write_csv(inbox / "inside.csv", prompts(2))
    with dagster_instance(dagster_storage) as instance:

        def run(url: str) -> dg.ExecuteInProcessResult:
            return submit_batch.execute_in_process(
                run_config={
                    "ops": {
                        "submit_prompts_file": {
                            "config": {"file_url": url, "default_endpoint": SEEDANCE}
                        }
                    }
                },
                instance=instance,
                resources={
                    "ledger": LedgerDatabase(url=ledger_url),
                    "prompts_inbox": PromptsInbox(url=inbox.as_uri()),
                    "fal": fal_connection(),
                },
                raise_on_error=False,
            )

        for url in (
            f"{base}/latest/token.csv",
            outside.as_uri(),
            f"{inbox.as_uri()}/../outside.csv",
            str(outside),
        ):
            result = run(url)
            assert not result.success, url
            message = result.failure_data_for_node("submit_prompts_file").error.message
            assert "not an allowed prompt source" in message or "must not" in message
        assert ledger_counts(conn) == (0, 0, 0)
        assert run(inside.as_uri()).success
    assert seen == []
    assert len(fal_sim.control.ground_truth()) == 2


def test_a_symlink_in_the_inbox_to_a_file_elsewhere_is_refused(tmp_path: Path) -> None:

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    secret = write_csv(tmp_path / "private.csv", [{"prompt": "internal"}])
    (inbox / "link.csv").symlink_to(secret)
    (inbox / "real.csv").write_text("prompt\nok\n")
    check_source((inbox / "real.csv").as_uri(), [inbox.as_uri()], allow_local=False)
    with pytest.raises(PromptFileError, match="not an allowed prompt source"):
        check_source((inbox / "link.csv").as_uri(), [inbox.as_uri()], allow_local=False)
