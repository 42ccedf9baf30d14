"""`renderqueue db reset`: drop and recreate the ledger database, then migrate it.

For a database made by the pre-release migration files (or any ledger you mean to throw
away). It touches the one database named in the URL in use and nothing else on the server.
"""

from __future__ import annotations

import click
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.db.server import database_url, psycopg_url, with_database
from renderqueue_pipeline.errors import RenderqueueError

_NEVER_DROPPED = frozenset({"postgres", "template0", "template1"})


def describe(url: str) -> tuple[str, str]:
    """(database name, where it lives) for messages; never the password."""
    params = conninfo_to_dict(psycopg_url(url))
    host = str(params.get("host") or "localhost")
    port = params.get("port")
    return str(params.get("dbname") or ""), f"{host}:{port}" if port else host


def reset_database(url: str) -> list[str]:
    """Drop the database of `url` (closing its sessions), create it empty, migrate it.

    Returns the migrations applied. Refuses the server's own databases.
    """
    name, where = describe(url)
    if not name or name in _NEVER_DROPPED:
        raise RenderqueueError(f"refusing to reset database {name!r} on {where}")
    admin = with_database(psycopg_url(url), "postgres")
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        raise RenderqueueError(
            f"could not reset database {name!r} on {where}: {exc.diag.message_primary or exc}"
        ) from exc
    return migrate(url)


@click.command("reset")
@click.option("--yes", is_flag=True, help="Do not ask before dropping the database.")
def db_reset(yes: bool) -> None:
    """Drop the ledger database and recreate it from sql/ (all its data is lost)."""

    url = database_url()
    name, where = describe(url)
    if not yes:
        click.confirm(
            f"Drop database {name!r} on {where} with every generation, event and report "
            "in it, and recreate it empty?",
            abort=True,
        )
    applied = reset_database(url)
    click.echo(f"recreated {name!r} on {where}; applied {len(applied)} migrations")
