"""Migrations: idempotent, safe from two processes at once, append-only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from renderqueue_pipeline.db.migrate import MigrationError, load_migrations, migrate, sql_dir


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
    outputs = sorted(out for out, _ in results)
    assert outputs[0].strip() == "database is up to date" or "applied" in outputs[0]
    # each migration was applied by exactly one of the two processes
    applied = [
        line for out, _ in results for line in out.splitlines() if line.startswith("applied")
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
        MigrationError, match="001_generations.sql was changed after it was applied"
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
    with pytest.raises(MigrationError, match="999_broken.sql failed"):
        migrate(url, folder)
    with psycopg.connect(url) as conn:
        assert conn.execute("select to_regclass('half_done')").fetchone()[0] is None
        versions = [r[0] for r in conn.execute("select version from schema_migrations")]
    assert "999" not in versions and "001" in versions
