"""Build or upgrade a renderqueue database from sql/.

    sql/schema/*.sql      the tables, types, indexes, views and roles as they are now, one
                          file per topic: a new database is made from them, in file-name
                          order, in one transaction
    sql/functions/*.sql   `create or replace` functions and the triggers that call them,
                          each function in one file: a file is applied again whenever its
                          text changes (checksums in `schema_functions`)
    sql/migrations/*.sql  numbered table changes, append-only: a new database is recorded
                          at the newest; an older one gets the missing ones, in order, one
                          transaction each (checksums in `schema_migrations`)

After any run that changed something the role grants are applied again (`rq_grant_roles()`,
sql/functions/roles.sql): CREATE OR REPLACE resets a function's SECURITY DEFINER.

The whole run holds a session advisory lock, so processes that migrate at the same moment
take turns and the later ones find nothing left to do. A recorded migration whose text has
changed since is an error.

A database made by the 25 flat files of the layout before this one (sql/001..190, all
recorded) is recognised as the baseline (migrations/000_baseline.sql) and upgraded in
place. One made by fewer of them, or by the pre-release files before them, cannot be: it
is refused with a message naming the fix, `renderqueue db reset`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, LiteralString, cast

import psycopg
from psycopg.rows import tuple_row

from renderqueue_pipeline.db import one_row
from renderqueue_pipeline.db.server import psycopg_url
from renderqueue_pipeline.errors import RenderqueueError

MIGRATION_LOCK_ID = 0x72656E6465727175  # "renderqu": one id for every renderqueue database
_MIGRATION_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")
_FUNCTIONS = "functions/"
BASELINE = "000_baseline"
# The flat files sql/ held before the schema/functions/migrations layout: a database that
# recorded all of them is at the baseline.
FLAT_LAYOUT_MIGRATIONS = frozenset(
    {
        "001_generations",
        "002_ledger_tables",
        "003_state_machine",
        "004_prices",
        "005_row_data_never_sinks_an_event",
        "006_retried_webhook_is_a_no_op",
        "007_apply_waiting_by_request",
        "010_fal_expiry",
        "020_batch_submission",
        "030_reconcile",
        "040_archive",
        "050_spend_reports",
        "070_spend",
        "080_outputs_as_fal_sent",
        "081_billed_totals_in_reports",
        "085_injectable_clock",
        "090_claims_and_send_time_admission",
        "095_money_is_bigint_and_raw_completions_are_priced",
        "096_closed_months_marked_changed",
        "110_adopt_fal_requests",
        "111_adopted_requests_keep_their_send_month",
        "128_analyst_views",
        "130_budget_alerts",
        "145_clips_priced_from_their_measured_length",
        "190_least_privilege_roles",
    }
)
# The files sql/ held before those (001 is shared and not listed).
PRE_RELEASE_MIGRATIONS = frozenset(
    {
        "002_ledger",
        "003_ledger_rules",
        "004_seed_prices",
        "005_record_events_batch",
        "006_set_based_apply",
    }
)
RESET_HINT = (
    "run `renderqueue db reset` (it drops and recreates this database: its data is lost) "
    "or drop the database by hand, then migrate again"
)


def _sql_text(path: Path) -> LiteralString:
    """A file of our own sql/ folder, typed `LiteralString` as `db.queries.q` types a query:
    SQL we wrote, never input, which is what psycopg's `execute` asks for."""
    return cast(LiteralString, path.read_text())


class MigrationError(RenderqueueError):
    """A migration failed or a recorded one was edited."""


@dataclass(frozen=True)
class Migration:
    """One step `migrate` may apply: a numbered migration, or a function file.

    A function file's version and name are both `functions/<stem>`.
    """

    version: str
    name: str
    sql: LiteralString

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def is_functions(self) -> bool:
        return self.name.startswith(_FUNCTIONS)


def sql_dir() -> Path:
    """The sql/ folder: beside the package in a checkout, inside it when installed."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "sql", here / "_sql"):
        if candidate.is_dir():
            return candidate
    raise MigrationError(f"no sql/ folder found beside {here}")


def load_schema(folder: Path | None = None) -> list[tuple[str, LiteralString]]:
    """(file name, text) of sql/schema/, in the order a new database runs them."""
    folder = folder or sql_dir()
    return [(p.name, _sql_text(p)) for p in sorted((folder / "schema").glob("*.sql"))]


def load_migrations(folder: Path | None = None) -> list[Migration]:
    """Every step, in the order `migrate` applies them: the numbered migrations in version
    order, then the function files in name order."""
    folder = folder or sql_dir()
    found = []
    for path in sorted((folder / "migrations").glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append(Migration(match.group(1), path.stem, _sql_text(path)))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version number in {folder}")
    for path in sorted((folder / "functions").glob("*.sql")):
        name = _FUNCTIONS + path.stem
        found.append(Migration(name, name, _sql_text(path)))
    return found


def missing_migrations(conn: psycopg.Connection[Any], migrations: list[Migration]) -> list[str]:
    """Names of the steps not recorded here (or recorded under another name or text).

    Read-only (no lock, no DDL), so any role that may read `schema_migrations` can ask: the
    receiver checks it at start, `migrate` uses it to do nothing as a role that cannot
    migrate. A database that also holds newer migrations than these files is current.
    """
    cursor = conn.cursor(row_factory=tuple_row)  # whatever the connection's row factory
    (tables,) = one_row(
        cursor.execute(
            "select array[to_regclass('schema_migrations') is not null,"
            " to_regclass('schema_functions') is not null]"
        )
    )
    recorded: dict[str, tuple[str, str]] = {}
    if tables[0]:
        for version, name, checksum in cursor.execute(
            "select version, name, checksum from schema_migrations"
        ):
            recorded[version] = (name, checksum)
    if tables[1]:
        for name, checksum in cursor.execute("select name, checksum from schema_functions"):
            recorded[name] = (name, checksum)
    return [m.name for m in migrations if recorded.get(m.version) != (m.name, m.checksum)]


def migrate(url: str, folder: Path | None = None) -> list[str]:
    """Apply what is missing; return the names applied (empty when already up to date).

    A new database gets every migration's name (it is made at the newest) and every
    function file's. An up-to-date database is only read (no advisory lock, no DDL), so the
    pipeline's and the CLI's roles, which may not migrate, can call this before their work.
    """
    migrations = load_migrations(folder)
    with psycopg.connect(psycopg_url(url), autocommit=True) as conn:
        try:
            if not missing_migrations(conn, migrations):
                return []
            return _migrate_locked(conn, load_schema(folder), migrations)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise MigrationError(
                "this login may not migrate (permission denied: "
                f"{exc.diag.message_primary}); run `renderqueue db migrate` as the database "
                "owner (see docs/security.md)"
            ) from None
        except MigrationError as exc:
            if isinstance(exc.__cause__, psycopg.errors.InsufficientPrivilege):
                raise MigrationError(
                    f"{exc}; run `renderqueue db migrate` as the database owner"
                ) from None
            raise


def _migrate_locked(
    conn: psycopg.Connection, schema: list[tuple[str, LiteralString]], steps: list[Migration]
) -> list[str]:
    """Apply the missing steps under the advisory lock (one database at a time)."""
    migrations = [m for m in steps if not m.is_functions]
    applied: list[str] = []
    conn.execute("select pg_advisory_lock(%s)", (MIGRATION_LOCK_ID,))
    try:
        conn.execute(
            """create table if not exists schema_migrations (
                 version text primary key,
                 name text not null,
                 checksum text not null,
                 applied_at timestamptz not null default now())"""
        )
        recorded_rows = conn.execute(
            "select version, name, checksum from schema_migrations order by version"
        ).fetchall()
        _refuse_other_lineage(recorded_rows, migrations)
        conn.execute(
            """create table if not exists schema_functions (
                 name text primary key,
                 checksum text not null,
                 applied_at timestamptz not null default now())"""
        )
        if not recorded_rows:
            applied += _create(conn, schema, migrations)
        else:
            names = {name for _, name, _ in recorded_rows}
            if names >= FLAT_LAYOUT_MIGRATIONS:
                applied += _adopt_flat_layout(conn, migrations)
            applied += _apply_migrations(conn, migrations)
        applied += _apply_functions(conn, [m for m in steps if m.is_functions])
        if applied:
            _grant_roles(conn)
    finally:
        conn.execute("select pg_advisory_unlock(%s)", (MIGRATION_LOCK_ID,))
    return applied


def _record(conn: psycopg.Connection, migration: Migration) -> None:
    conn.execute(
        "insert into schema_migrations (version, name, checksum) values (%s, %s, %s)",
        (migration.version, migration.name, migration.checksum),
    )


def _create(
    conn: psycopg.Connection, schema: list[tuple[str, LiteralString]], migrations: list[Migration]
) -> list[str]:
    """A new database: sql/schema/ in one transaction, recorded at the newest migration."""
    if not schema:
        raise MigrationError("no sql/schema/*.sql files to make a new database from")
    with conn.transaction():
        for file_name, text in schema:
            try:
                conn.execute(text)
            except psycopg.Error as exc:
                raise MigrationError(f"schema/{file_name} failed: {exc}") from exc
        for migration in migrations:
            _record(conn, migration)
    return [m.name for m in migrations]


def _adopt_flat_layout(conn: psycopg.Connection, migrations: list[Migration]) -> list[str]:
    """A database made by the 25 flat files is at the baseline: record it so."""
    baseline = next((m for m in migrations if m.name == BASELINE), None)
    if baseline is None:
        raise MigrationError(f"no migrations/{BASELINE}.sql to adopt this database at")
    with conn.transaction():
        conn.execute(
            "delete from schema_migrations where name = any(%s)",
            (sorted(FLAT_LAYOUT_MIGRATIONS),),
        )
        _record(conn, baseline)
    return [baseline.name]


def _apply_migrations(conn: psycopg.Connection, migrations: list[Migration]) -> list[str]:
    """The numbered migrations not recorded yet, in order, one transaction each."""
    done = dict(conn.execute("select version, checksum from schema_migrations").fetchall())
    applied = []
    for migration in migrations:
        recorded = done.get(migration.version)
        if recorded is not None:
            if recorded != migration.checksum:
                raise MigrationError(
                    f"{migration.name}.sql was changed after it was applied; "
                    "add a new migration instead of editing an applied one"
                )
            continue
        try:
            with conn.transaction():
                conn.execute(migration.sql)
                _record(conn, migration)
        except psycopg.Error as exc:
            raise MigrationError(f"{migration.name}.sql failed: {exc}") from exc
        applied.append(migration.name)
    return applied


def _apply_functions(conn: psycopg.Connection, files: list[Migration]) -> list[str]:
    """The function files whose text differs from the one last applied, in one transaction
    (a file may call a function of another, so they land together)."""
    done = dict(conn.execute("select name, checksum from schema_functions").fetchall())
    changed = [f for f in files if done.get(f.name) != f.checksum]
    if not changed:
        return []
    with conn.transaction():
        for file in changed:
            try:
                conn.execute(file.sql)
            except psycopg.Error as exc:
                raise MigrationError(f"{file.name}.sql failed: {exc}") from exc
            conn.execute(
                "insert into schema_functions (name, checksum) values (%s, %s) "
                "on conflict (name) do update set checksum = excluded.checksum, "
                "applied_at = now()",
                (file.name, file.checksum),
            )
    return [f.name for f in changed]


def _grant_roles(conn: psycopg.Connection) -> None:
    """Re-apply the role grants after anything was applied (a CREATE OR REPLACE resets a
    function's SECURITY DEFINER; a new table needs its grants)."""
    (exists,) = one_row(conn.execute("select to_regprocedure('rq_grant_roles()') is not null"))
    if exists:
        try:
            with conn.transaction():
                conn.execute("call rq_grant_roles()")
        except psycopg.Error as exc:
            raise MigrationError(f"re-applying the role grants failed: {exc}") from exc


def _refuse_other_lineage(
    recorded: list[tuple[str, str, str]], migrations: list[Migration]
) -> None:
    """Refuse a database these files cannot upgrade: one made by the pre-release files, by
    part of the flat layout, or whose recorded migrations are not these files."""
    names = {m.version: m.name for m in migrations}
    recorded_names = {name for _, name, _ in recorded}
    pre_release = sorted(recorded_names & PRE_RELEASE_MIGRATIONS)
    if pre_release:
        raise MigrationError(
            "this database was made by the pre-release migration files "
            f"({', '.join(pre_release)}), which were replaced by a new baseline and cannot "
            f"be upgraded in place; {RESET_HINT}"
        )
    flat = recorded_names & FLAT_LAYOUT_MIGRATIONS
    if flat:
        if flat != FLAT_LAYOUT_MIGRATIONS:
            missing = sorted(FLAT_LAYOUT_MIGRATIONS - flat)
            raise MigrationError(
                f"this database was made by {len(flat)} of the 25 flat migration files of "
                f"an older renderqueue (it lacks {', '.join(missing)}), and only a database "
                f"with all of them is upgraded in place; {RESET_HINT}"
            )
        return
    for version, name, _ in recorded:
        if version in names and names[version] != name:
            raise MigrationError(
                f"migration {version} is recorded as {name}.sql but the file is now "
                f"{names[version]}.sql; {RESET_HINT}"
            )
