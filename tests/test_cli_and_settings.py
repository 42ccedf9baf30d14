"""The command line and configuration: what a user types and what they read back."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from conftest import TEST_HOME

from renderqueue_pipeline.cli import main
from renderqueue_pipeline.db.server import as_user
from renderqueue_pipeline.settings import ConfigError, load_settings


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("DATABASE_URL", "mysql://x@y/z", "DATABASE_URL: expected a postgresql:// URL"),
        ("FAL_JWKS_URL", "ftp://keys", "FAL_JWKS_URL: expected an https:// URL"),
        ("FAL_JWKS_URL", "", "FAL_JWKS_URL: is empty"),
        ("FAL_WEBHOOK_USER_IDS", " , ", "FAL_WEBHOOK_USER_IDS: expected comma-separated"),
        ("RENDERQUEUE_WEBHOOK_URL", "not a url", "RENDERQUEUE_WEBHOOK_URL: expected an http(s)"),
        (
            "RENDERQUEUE_WEBHOOK_FLUSHERS",
            "0",
            "RENDERQUEUE_WEBHOOK_FLUSHERS: Input should be greater than or equal to 1",
        ),
        (
            "RENDERQUEUE_WEBHOOK_FLUSHERS",
            "many",
            "RENDERQUEUE_WEBHOOK_FLUSHERS: Input should be a valid integer",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_settings()
    cli = subprocess.run(
        [sys.executable, "-m", "renderqueue_pipeline.cli", "db", "url"],
        env={**os.environ, variable: value},
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2
    assert cli.stderr.strip().startswith(f"renderqueue: {says}")
    assert "Traceback" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1


def test_a_bad_database_url_is_reported_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bad = "mysql://bob:s3cret-pw@db.internal/ledger"
    monkeypatch.setenv("DATABASE_URL", bad)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "s3cret-pw" not in str(raised.value)
    assert "bob:***@db.internal" in str(raised.value)
    cli = subprocess.run(
        [sys.executable, "-m", "renderqueue_pipeline.cli", "db", "url"],
        env={**os.environ, "DATABASE_URL": bad},
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2
    assert "s3cret-pw" not in cli.stdout + cli.stderr


def test_webhook_user_ids_are_a_comma_separated_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAL_WEBHOOK_USER_IDS", raising=False)
    assert load_settings().webhook_user_id_set is None
    monkeypatch.setenv("FAL_WEBHOOK_USER_IDS", "usr_1, usr_2,,")
    assert load_settings().webhook_user_id_set == frozenset({"usr_1", "usr_2"})


@pytest.mark.parametrize(
    ("jwks_url", "flags", "says"),
    [
        ("http://127.0.0.1:9/jwks.json", [], "FAL_JWKS_URL must be an https:// URL"),
        ("", ["--insecure-jwks"], "FAL_JWKS_URL: is empty"),
    ],
)
def test_webhook_serve_refuses_an_unusable_jwks_url_at_start(
    ledger_url: str, tmp_path: Path, jwks_url: str, flags: list[str], says: str
) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": ledger_url,
        "FAL_JWKS_URL": jwks_url,
        "RENDERQUEUE_HOME": str(tmp_path),
    }
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "renderqueue_pipeline.cli",
            "webhook",
            "serve",
            "--port",
            "0",
            *flags,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2, cli.stdout + cli.stderr
    assert cli.stderr.strip().startswith(f"renderqueue: {says}")
    assert "Traceback" not in cli.stderr


def test_the_embedded_servers_path_is_shell_quoted_for_su() -> None:

    cmd = ["/opt/pg/bin/pg_ctl", "-D", "/srv/my home/it's $(touch pwned)/pg", "stop"]
    wrapped = as_user("pgserver", cmd)
    assert wrapped[:5] == ["su", "pgserver", "-s", "/bin/sh", "-c"]
    assert shlex.split(wrapped[5]) == cmd  # what /bin/sh will run: the same arguments


def test_secrets_do_not_show_in_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAL_KEY", "super-secret-key")
    settings = load_settings()
    assert "super-secret-key" not in repr(settings)
    assert settings.fal_key.get_secret_value() == "super-secret-key"


def test_db_url_migrate_twice_and_status(ledger_env: str) -> None:
    runner = CliRunner()
    url = runner.invoke(main, ["db", "url"])
    assert url.exit_code == 0
    assert url.output.strip() == ledger_env
    for _ in range(2):
        migrated = runner.invoke(main, ["db", "migrate"])
        assert migrated.exit_code == 0
        assert migrated.output.strip() == "database is up to date"
    with psycopg.connect(ledger_env) as conn:
        conn.execute(
            "insert into generations (request_id, user_id, endpoint, inputs, cost_cents) "
            "values ('cli-1', 1, 'fal-ai/veo3.1', '{\"prompt\": \"x\"}', 320)"
        )
    status = runner.invoke(main, ["db", "status"])
    assert status.exit_code == 0
    assert "fal-ai/veo3.1" in status.output
    assert "$3.200000" in status.output
    with psycopg.connect(ledger_env) as conn:
        conn.execute("truncate generations cascade")


def test_embedded_server_is_shared_between_processes(admin_url: str) -> None:
    """Another process on the same home reuses the running server instead of starting one."""
    if os.environ.get("DATABASE_URL"):
        pytest.skip("DATABASE_URL is set: no embedded server in use")

    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    cli = subprocess.run(
        [sys.executable, "-m", "renderqueue_pipeline.cli", "db", "url"],
        env={**env, "RENDERQUEUE_HOME": str(TEST_HOME)},
        capture_output=True,
        text=True,
        check=True,
    )
    started = "select pg_postmaster_start_time() as t"
    with psycopg.connect(cli.stdout.strip()) as theirs, psycopg.connect(admin_url) as ours:
        assert theirs.execute(started).fetchone() == ours.execute(started).fetchone()


def test_the_default_home_is_under_the_working_folder_not_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """$HOME must not leak into RENDERQUEUE_HOME (the field is called `home`)."""
    monkeypatch.delenv("RENDERQUEUE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "somebody"))
    monkeypatch.chdir(tmp_path)
    assert load_settings().home_dir == tmp_path / ".renderqueue"
