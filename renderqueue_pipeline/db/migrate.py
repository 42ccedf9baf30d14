"""Apply the numbered migrations in sql/ in order.

Each file runs in its own transaction and is recorded in `schema_migrations` with its
checksum. The whole run holds a session advisory lock, so processes that migrate at the
same moment take turns and the later ones find nothing left to do. A recorded file whose
text has changed since is an error: migrations are append-only.

A database made by the pre-release migration files (before the sql/ baseline was
rewritten into one file per topic) cannot be upgraded in place: it is refused with a
message naming the fix, `renderqueue db reset`.
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
# The files sql/ held before the baseline (001 is unchanged and not listed).
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


class MigrationError(RenderqueueError):
    """A migration failed or a recorded one was edited."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def sql_dir() -> Path:
    """The sql/ folder: beside the package in a checkout, inside it when installed."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "sql", here / "_sql"):
        if candidate.is_dir():
            return candidate
    raise MigrationError(f"no sql/ folder found beside {here}")


def load_migrations(folder: Path | None = None) -> list[Migration]:
    """The migration files in version order (sql/queries/ and other names are not)."""
    folder = folder or sql_dir()
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append(Migration(match.group(1), path.stem, path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version number in {folder}")
    return found


def missing_migrations(conn: psycopg.Connection[Any], migrations: list[Migration]) -> list[str]:
    """Names of the migrations not recorded (or recorded under another name or text) here.

    Read-only (no lock, no DDL), so any role that may read `schema_migrations` can ask: the
    receiver checks it at start, `migrate` uses it to do nothing as a role that cannot
    migrate. A database that also holds newer migrations than these files is current.
    """
    cursor = conn.cursor(row_factory=tuple_row)  # whatever the connection's row factory
    (exists,) = one_row(cursor.execute("select to_regclass('schema_migrations') is not null"))
    if not exists:
        return [m.name for m in migrations]
    recorded = {
        version: (name, checksum)
        for version, name, checksum in cursor.execute(
            "select version, name, checksum from schema_migrations"
        ).fetchall()
    }
    return [m.name for m in migrations if recorded.get(m.version) != (m.name, m.checksum)]


def migrate(url: str, folder: Path | None = None) -> list[str]:
    """Apply what is missing; return the names applied (empty when already up to date).

    An up-to-date database is only read (no advisory lock, no DDL), so the pipeline's and
    the CLI's roles, which may not migrate, can call this before their work. After a run
    that applied anything, the role grants are re-applied (`rq_grant_roles()`, sql/190).
    """
    migrations = load_migrations(folder)
    with psycopg.connect(psycopg_url(url), autocommit=True) as conn:
        try:
            if not missing_migrations(conn, migrations):
                return []
            return _migrate_locked(conn, migrations)
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


def _migrate_locked(conn: psycopg.Connection, migrations: list[Migration]) -> list[str]:
    """Apply the missing migrations under the advisory lock (one database at a time)."""
    applied: list[str] = []
    ran: list[Migration] = []
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
        done = {version: checksum for version, _, checksum in recorded_rows}
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
                    # LiteralString as in db.queries.q: the text is our own sql/ file, not input
                    conn.execute(cast(LiteralString, migration.sql))
                    conn.execute(
                        "insert into schema_migrations (version, name, checksum) "
                        "values (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
            except psycopg.Error as exc:
                raise MigrationError(f"{migration.name}.sql failed: {exc}") from exc
            applied.append(migration.name)
            ran.append(migration)
        # once more unless the last file applied ended by doing it itself (sql/190 does)
        if applied and "call rq_grant_roles()" not in ran[-1].sql:
            _grant_roles(conn)
    finally:
        conn.execute("select pg_advisory_unlock(%s)", (MIGRATION_LOCK_ID,))
    return applied


def _grant_roles(conn: psycopg.Connection) -> None:
    """Re-apply the role grants after migrations ran (a migration numbered below 190 that
    lands later, or a CREATE OR REPLACE that reset a function's SECURITY DEFINER)."""
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
    """Refuse a database whose recorded migrations are not a prefix of these files."""
    names = {m.version: m.name for m in migrations}
    pre_release = sorted(name for _, name, _ in recorded if name in PRE_RELEASE_MIGRATIONS)
    if pre_release:
        raise MigrationError(
            "this database was made by the pre-release migration files "
            f"({', '.join(pre_release)}), which were replaced by a new baseline and cannot "
            f"be upgraded in place; {RESET_HINT}"
        )
    for version, name, _ in recorded:
        if version in names and names[version] != name:
            raise MigrationError(
                f"migration {version} is recorded as {name}.sql but the file is now "
                f"{names[version]}.sql; {RESET_HINT}"
            )
