"""Migrations: idempotent, safe from two processes at once, append-only."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from renderqueue_pipeline.cli import main
from renderqueue_pipeline.db.migrate import MigrationError, load_migrations, migrate, sql_dir
from renderqueue_pipeline.db.server import with_database


def schema_fingerprint(url: str) -> list[tuple]:
    """Everything a migration creates, in a comparable form."""
    with psycopg.connect(url) as conn:
        columns = conn.execute(
            "select table_name, column_name, data_type, is_nullable, column_default "
            "from information_schema.columns where table_schema = 'public' order by 1, 2"
        ).fetchall()
        indexes = conn.execute(
            "select indexname, indexdef from pg_indexes where schemaname = 'public' order by 1"
        ).fetchall()
        functions = conn.execute(
            "select proname, md5(prosrc) from pg_proc p "
            "join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'public' order by 1"
        ).fetchall()
        triggers = conn.execute(
            "select tgname from pg_trigger where not tgisinternal order by 1"
        ).fetchall()
        migrations = conn.execute(
            "select version, name, checksum from schema_migrations order by 1"
        ).fetchall()
        prices = conn.execute("select count(*) from prices").fetchall()
    return [*columns, *indexes, *functions, *triggers, *migrations, *prices]


def test_applied_twice_is_a_no_op(make_database: Callable[[], str]) -> None:
    url = make_database()
    first = migrate(url)
    assert first == [m.name for m in load_migrations()]
    before = schema_fingerprint(url)
    assert migrate(url) == []
    assert schema_fingerprint(url) == before


def test_two_processes_at_once_end_in_the_same_schema(make_database: Callable[[], str]) -> None:
    reference = make_database()
    migrate(reference)
    url = make_database()
    cli = [sys.executable, "-m", "renderqueue_pipeline.cli", "db", "migrate"]
    env = {**os.environ, "DATABASE_URL": url}
    procs = [
        subprocess.Popen(cli, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    # each process either applied some migrations or found nothing left to do; each
    # migration was applied by exactly one of them
    for out, _ in results:
        lines = out.splitlines()
        assert lines == ["database is up to date"] or (
            lines and all(line.startswith("applied ") for line in lines)
        ), out
    applied = [
        line for out, _ in results for line in out.splitlines() if line != "database is up to date"
    ]
    assert sorted(applied) == sorted(f"applied {m.name}" for m in load_migrations())
    assert schema_fingerprint(url) == schema_fingerprint(reference)


def test_an_edited_applied_migration_is_refused(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    shutil.copytree(sql_dir(), folder)
    url = make_database()
    migrate(url, folder)
    first = sorted(folder.glob("001_*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(
        MigrationError, match=re.escape("001_generations.sql was changed after it was applied")
    ):
        migrate(url, folder)


def test_a_failing_migration_rolls_back_whole(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    shutil.copytree(sql_dir(), folder)
    (folder / "999_broken.sql").write_text(
        "create table half_done (id int);\nselect * from no_such_table;\n"
    )
    url = make_database()
    with pytest.raises(MigrationError, match=re.escape("999_broken.sql failed")):
        migrate(url, folder)
    with psycopg.connect(url) as conn:
        assert conn.execute("select to_regclass('half_done')").fetchone()[0] is None
        versions = [r[0] for r in conn.execute("select version from schema_migrations")]
    assert "999" not in versions
    assert "001" in versions


PRE_RELEASE = [
    ("001", "001_generations"),
    ("002", "002_ledger"),
    ("003", "003_ledger_rules"),
    ("004", "004_seed_prices"),
    ("005", "005_record_events_batch"),
    ("006", "006_set_based_apply"),
]


def make_pre_release_database(url: str) -> None:
    """What the pre-release files left: their names in schema_migrations, and data."""
    first = load_migrations()[0]
    with psycopg.connect(url) as conn:
        conn.execute(first.sql)
        conn.execute(
            "create table schema_migrations (version text primary key, name text not null, "
            "checksum text not null, applied_at timestamptz not null default now())"
        )
        for version, name in PRE_RELEASE:
            checksum = first.checksum if version == "001" else f"old-{version}"
            conn.execute(
                "insert into schema_migrations (version, name, checksum) values (%s, %s, %s)",
                (version, name, checksum),
            )
        conn.execute(
            "insert into generations (request_id, user_id, endpoint, inputs) "
            "values ('old-1', 1, 'a/b', '{}')"
        )


def test_a_pre_release_database_is_refused_naming_the_fix(
    make_database: Callable[[], str],
) -> None:
    url = make_database()
    make_pre_release_database(url)
    with pytest.raises(MigrationError) as refused:
        migrate(url)
    message = str(refused.value)
    assert "pre-release migration files" in message
    assert "002_ledger, 003_ledger_rules" in message
    assert "renderqueue db reset" in message
    assert "drop the database by hand" in message
    with psycopg.connect(url) as conn:  # nothing was changed
        assert conn.execute("select to_regclass('prices')").fetchone()[0] is None


def test_a_renamed_migration_is_refused(make_database: Callable[[], str], tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    shutil.copytree(sql_dir(), folder)
    url = make_database()
    migrate(url, folder)
    prices = sorted(folder.glob("004_*.sql"))[0]
    prices.rename(folder / "004_renamed.sql")
    moved = re.escape("recorded as 004_prices.sql but the file is now")
    with pytest.raises(MigrationError, match=moved):
        migrate(url, folder)


def test_db_reset_asks_then_recreates_only_its_database(
    make_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from renderqueue_pipeline.settings import get_settings

    url, other = make_database(), make_database()
    make_pre_release_database(url)
    with psycopg.connect(other) as conn:
        conn.execute("create table keep_me (id int)")
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("RENDERQUEUE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        refused = runner.invoke(main, ["db", "migrate"])
        assert refused.exit_code == 2
        assert "renderqueue db reset" in refused.output

        declined = runner.invoke(main, ["db", "reset"], input="n\n")
        assert declined.exit_code == 1
        assert "Drop database" in declined.output
        with psycopg.connect(url) as conn:  # still there
            assert conn.execute("select count(*) from generations").fetchone()[0] == 1

        done = runner.invoke(main, ["db", "reset", "--yes"])
        assert done.exit_code == 0, done.output
        assert f"applied {len(load_migrations())} migrations" in done.output
    finally:
        get_settings.cache_clear()
    assert migrate(url) == []
    with psycopg.connect(url) as conn:
        assert conn.execute("select count(*) from generations").fetchone()[0] == 0
        names = [r[0] for r in conn.execute("select name from schema_migrations order by 1")]
    assert names == [m.name for m in load_migrations()]
    with psycopg.connect(other) as conn:
        assert conn.execute("select to_regclass('keep_me')").fetchone()[0] == "keep_me"
    with psycopg.connect(with_database(url, "postgres")) as conn:
        assert conn.execute("select 1 from pg_database where datname = 'postgres'").fetchone()


def test_rows_the_ledger_rewrote_get_fals_payload_back(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    """080: `outputs` holds fal's payload as sent; rows completed before it get it back."""
    from ledger_helpers import submit_row, video_payload

    from renderqueue_pipeline.ledger import LedgerEvent, record_event

    before_080 = tmp_path / "sql"
    shutil.copytree(sql_dir(), before_080)
    for later in before_080.glob("080_*.sql"):
        later.unlink()
    url = make_database()
    migrate(url, before_080)
    payload = video_payload(seed=42)
    with psycopg.connect(url, row_factory=dict_row) as conn:
        request_id, _ = submit_row(conn)
        assert record_event(conn, LedgerEvent(request_id, "completed", payload)) == "applied"
        rewritten = conn.execute(
            "select outputs from generations where request_id = %s", (request_id,)
        ).fetchone()["outputs"]
        assert rewritten["video_url"] == payload["video"]["url"]  # the old flat shape
        # a row written by the seed article's own statement, in its own shape, no event
        theirs, _ = submit_row(conn)
        own = {"video_url": "s3://ours/a.mp4", "original_url": payload["video"]["url"]}
        conn.execute(
            "update generations set status = 'completed', outputs = %s where request_id = %s",
            (Jsonb(own), theirs),
        )
        conn.commit()

    migrate(url)
    with psycopg.connect(url, row_factory=dict_row) as conn:
        rows = {
            r["request_id"]: r
            for r in conn.execute("select request_id, outputs, archive_status from generations")
        }
    assert rows[request_id]["outputs"] == payload
    assert rows[request_id]["archive_status"] == "pending"
    assert rows[theirs]["outputs"] == own
