"""Logins in the least-privilege roles of sql/schema/90_roles.sql (`renderqueue db grant`).

The migrations create three NOLOGIN roles (receiver, pipeline, analyst); a process connects
as a LOGIN that is a member of exactly one of them. Passwords never appear in a statement
the server could log: libpq hashes them (SCRAM-SHA-256) on this side and the server only
stores the verifier. Works for a superuser and for a managed Postgres's admin that has
CREATEROLE (and ADMIN OPTION on the three roles, which it has when it ran the migrations).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode, urlparse, urlunparse

import psycopg
from psycopg import sql

from renderqueue_pipeline.db import one_row
from renderqueue_pipeline.db.server import psycopg_url
from renderqueue_pipeline.errors import RenderqueueError

#: the part of the product -> its NOLOGIN role (sql/schema/90_roles.sql)
ROLES = {
    "receiver": "renderqueue_receiver",
    "pipeline": "renderqueue_pipeline",
    "analyst": "renderqueue_analyst",
}
#: where `renderqueue db grant` reads the new login's password (else it prompts)
PASSWORD_ENV = "RENDERQUEUE_DB_PASSWORD"  # noqa: S105 - the variable's name, not a password
#: the logins `renderqueue dev` runs the receiver and Dagster as
DEV_LOGINS = {"receiver": "rq_receiver", "pipeline": "rq_pipeline"}


class GrantError(RenderqueueError):
    """A login could not be made or changed (the message names it, never its password)."""


@dataclass(frozen=True)
class Granted:
    login: str
    role: str
    database: str
    created: bool


def check_password(password: str, source: str) -> str:
    """Surrounding whitespace dropped (a mounted secret's newline); control characters and
    an empty password refused, naming where it came from, never the value."""
    password = password.strip()
    if not password:
        raise GrantError(f"{source}: the password is empty")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in password):
        raise GrantError(f"{source}: the password contains a control character")
    return password


def grant_login(admin_url: str, part: str, login: str, password: str) -> Granted:
    """Create (or update) LOGIN `login` with `password`, a member of `part`'s role only.

    `admin_url` is the migrating owner's URL (a superuser, or an admin with CREATEROLE).
    Refuses a login that is a superuser, one of the three roles, or already a member of
    another renderqueue role (one login, one part).
    """
    if part not in ROLES:
        raise GrantError(f"unknown part {part!r}: expected one of {', '.join(ROLES)}")
    role = ROLES[part]
    if login in ROLES.values() or not login or login.startswith("pg_"):
        raise GrantError(f"{login!r} cannot be a login of renderqueue")
    try:
        with psycopg.connect(psycopg_url(admin_url), autocommit=True) as conn:
            return _grant(conn, role, login, password)
    except psycopg.Error as exc:
        message = exc.diag.message_primary if exc.diag else None
        raise GrantError(f"granting {role} to {login!r} failed: {message or exc}") from None


def _grant(conn: psycopg.Connection, role: str, login: str, password: str) -> Granted:
    if conn.execute("select 1 from pg_roles where rolname = %s", (role,)).fetchone() is None:
        raise GrantError(f"role {role} does not exist: run `renderqueue db migrate` first")
    found = conn.execute(
        "select rolsuper, array(select r.rolname from pg_auth_members m "
        "  join pg_roles r on r.oid = m.roleid where m.member = a.oid) "
        "from pg_roles a where rolname = %s",
        (login,),
    ).fetchone()
    if found is not None:
        superuser, member_of = found
        if superuser:
            raise GrantError(f"{login!r} is a superuser: use a login of its own")
        others = sorted(set(member_of) & set(ROLES.values()) - {role})
        if others:
            raise GrantError(f"{login!r} is already in {', '.join(others)}: one login, one part")
    verifier = conn.pgconn.encrypt_password(
        password.encode(), login.encode(), b"scram-sha-256"
    ).decode()
    with conn.transaction():
        if found is None:
            conn.execute(
                sql.SQL("create role {} login password {} in role {}").format(
                    sql.Identifier(login), sql.Literal(verifier), sql.Identifier(role)
                )
            )
        else:
            conn.execute(
                sql.SQL("alter role {} login password {}").format(
                    sql.Identifier(login), sql.Literal(verifier)
                )
            )
            conn.execute(
                sql.SQL("grant {} to {}").format(sql.Identifier(role), sql.Identifier(login))
            )
        database = one_row(conn.execute("select current_database()"))[0]
        conn.execute(
            sql.SQL("grant connect on database {} to {}").format(
                sql.Identifier(database), sql.Identifier(login)
            )
        )
    return Granted(login, role, database, created=found is None)


def login_url(url: str, login: str, password: str) -> str:
    """`url` (same server, database and options) connecting as `login` with `password`."""
    parsed = urlparse(psycopg_url(url))
    hostport = parsed.netloc.rpartition("@")[2]
    query = [
        (key, value)
        for key, value in parse_qsl(parsed.query, keep_blank_values=True)
        if key not in ("user", "password")
    ]
    userinfo = f"{quote(login, safe='')}:{quote(password, safe='')}"
    return urlunparse(
        parsed._replace(netloc=f"{userinfo}@{hostport}", query=urlencode(query, safe="/"))
    )


def dev_logins(admin_url: str) -> dict[str, str]:
    """`renderqueue dev`: logins for the receiver and the pipeline with fresh random
    passwords (new at every start, never written anywhere); their URLs by part."""
    urls = {}
    for part, login in DEV_LOGINS.items():
        password = secrets.token_urlsafe(24)
        grant_login(admin_url, part, login, password)
        urls[part] = login_url(admin_url, login, password)
    return urls
