"""Shared fixtures: a real Postgres (embedded, or DATABASE_URL) with a fresh, migrated database."""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import s3fs
from moto.server import ThreadedMotoServer

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.db.server import embedded_url, psycopg_url, sqlalchemy_url, with_database
from renderqueue_pipeline.settings import get_settings

REPO = Path(__file__).resolve().parent.parent
TEST_HOME = Path(os.environ.get("RENDERQUEUE_TEST_HOME", REPO / ".renderqueue" / "test"))

#: Fixture modules registered once for every test: a test names a fixture as a parameter
#: and never imports it (tests import their plain helpers from these modules as usual).
pytest_plugins = ["fal_sim_plugin", "spend_helpers", "webhook_helpers"]


def pytest_configure(config: pytest.Config) -> None:
    """Temp folders under this checkout, not the shared /tmp/pytest-of-<user>.

    pytest resets that shared folder to mode 700 at every start, which locks the embedded
    Postgres (its own system user when run as root) out of folders of a run in progress.
    """
    if not config.option.basetemp:
        TEST_HOME.mkdir(parents=True, exist_ok=True)  # a fresh checkout has none yet
        config.option.basetemp = str(TEST_HOME / "tmp")


LEDGER_TABLES = (
    "fal_orphan_requests",
    "fal_request_scans",
    "generation_events",
    "generations",
    "batch_items",
    "batches",
    "user_budgets",
    "budget_alerts",
    "spend_report_rows",
    "spend_rollup_daily",
    "spend_rollup_daily_batch",
    "spend_rollup_days",
    "spend_report_months",
    "spend_report_changes",
)


@pytest.fixture(scope="session")
def admin_url() -> str:
    """A URL to the `postgres` database of the test server (DATABASE_URL's server if set)."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        return with_database(psycopg_url(configured), "postgres")
    TEST_HOME.mkdir(parents=True, exist_ok=True)
    return embedded_url(TEST_HOME, "postgres")


@pytest.fixture(scope="session")
def make_database(admin_url: str) -> Iterator[Callable[[], str]]:
    """Factory for empty databases on the test server; all are dropped at the end."""
    created: list[str] = []

    def make() -> str:
        name = f"rq_test_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        created.append(name)
        return with_database(admin_url, name)

    yield make
    with psycopg.connect(admin_url, autocommit=True) as conn:
        dagster_homes = conn.execute(
            "select datname from pg_database where datname like %s",
            (DAGSTER_DATABASE_PREFIX.replace("_", r"\_") + "%",),
        ).fetchall()
        for name in created + [row[0] for row in dagster_homes]:
            conn.execute(f'drop database if exists "{name}" with (force)')


#: Dagster homes written by tests (ensure_dagster_home, the demo) name their storage database
#: from RENDERQUEUE_DAGSTER_DATABASE: one per test under this session's prefix, dropped with
#: the test databases, never the fixed `dagster` database every test would share.
DAGSTER_DATABASE_PREFIX = f"dagster_t{uuid.uuid4().hex[:8]}_"


@pytest.fixture(autouse=True)
def _own_dagster_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test its own Dagster database name; Settings cached by an earlier test (which
    would still name that test's database) are dropped."""
    monkeypatch.setenv(
        "RENDERQUEUE_DAGSTER_DATABASE", DAGSTER_DATABASE_PREFIX + uuid.uuid4().hex[:8]
    )
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


#: `renderqueue dev`'s logins (rq_receiver, rq_pipeline: DEV_LOGINS) are roles of the whole
#: server, not of one database, and every start gives them new passwords. Two pytest-xdist
#: workers on one server would lock each other's stack out ("password authentication failed
#: for user rq_pipeline" in the other's daemon), so a test that sets their passwords
#: (`running_stack`, `dev_logins`) takes its turn: `dev_logins_lock`.
DEV_LOGINS_LOCK_KEY = 0x72715F646576  # "rq_dev"


@pytest.fixture
def dev_logins_lock(admin_url: str) -> Iterator[None]:
    """Hold the server-wide turn on the dev logins for this test (an advisory lock in the
    `postgres` database, which every worker's admin connection shares); waits for a test of
    another worker to finish with them first."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(%s)", (DEV_LOGINS_LOCK_KEY,))
        try:
            yield
        finally:
            conn.execute("select pg_advisory_unlock(%s)", (DEV_LOGINS_LOCK_KEY,))


@pytest.fixture
def dagster_storage(make_database: Callable[[], str]) -> str:
    """A Dagster instance's storage URL: a database of its own on the test server, dropped
    at the end, so no test sees another's runs (never the fixed `dagster` database)."""

    return sqlalchemy_url(make_database(), driver="psycopg2")


@pytest.fixture(scope="session")
def ledger_url(make_database: Callable[[], str]) -> str:
    """One migrated ledger database for the session (tables are emptied after each test)."""
    url = make_database()
    migrate(url)
    return url


def empty_ledger(url: str) -> None:
    """Empty every ledger table (and, by cascade, the tables that refer to them)."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("set lock_timeout = '60s'")
        connection.execute(f"truncate {', '.join(LEDGER_TABLES)} restart identity cascade")


@pytest.fixture(autouse=True)
def _empty_ledger_after_each_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that used the shared ledger leaves it empty, passed or failed.

    Runs after the test's own fixtures are torn down (connections closed), so a test never
    sees another's rows, whichever fixture it reached the database through.
    """
    yield
    if "ledger_url" in request.fixturenames:
        empty_ledger(request.getfixturevalue("ledger_url"))


@pytest.fixture
def conn(ledger_url: str) -> Iterator[psycopg.Connection]:
    """A connection to the migrated ledger; every ledger table is emptied afterwards."""
    connection = connect(ledger_url)
    try:
        yield connection
    finally:
        connection.rollback()
        connection.close()


# -- settings: the one place tests set them (test_house_structure pins it) --------------------


def _setter(patch: pytest.MonkeyPatch) -> Callable[..., None]:
    """`set_env(NAME=value, OTHER=None)`: sets (None: removes) and drops the cached Settings."""

    def set_env(**values: str | None) -> None:
        for name, value in values.items():
            if value is None:
                patch.delenv(name, raising=False)
            else:
                patch.setenv(name, value)
        get_settings.cache_clear()

    return set_env


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Set renderqueue settings through the environment for this test only:
    `settings_env(NAME=value, OTHER=None)` sets (None: removes) and drops the cached
    Settings; they are dropped again at the end, before the environment is restored, so
    no value outlives the test, passed or failed."""

    yield _setter(monkeypatch)
    get_settings.cache_clear()


@contextmanager
def patched_settings(**values: str | None) -> Iterator[Callable[..., None]]:
    """`settings_env` for a wider scope (a module's fixture): the values hold inside the
    block; on the way out the cached Settings are dropped, then the environment restored."""

    with pytest.MonkeyPatch.context() as patch:
        set_env = _setter(patch)
        set_env(**values)
        try:
            yield set_env
        finally:
            get_settings.cache_clear()


@pytest.fixture
def ledger_env(ledger_url: str, settings_env: Callable[..., None], tmp_path: Path) -> str:
    """Point renderqueue's settings at the test ledger (for CLI and app tests)."""

    settings_env(DATABASE_URL=ledger_url, RENDERQUEUE_HOME=str(tmp_path / "home"))
    return ledger_url


@pytest.fixture
def archive_root(settings_env: Callable[..., None], tmp_path: Path) -> Path:
    """Archive storage in this test's folder: RENDERQUEUE_STORAGE_URL=file://<tmp>/archive."""

    root = tmp_path / "archive"
    settings_env(RENDERQUEUE_STORAGE_URL=f"file://{root}")
    return root


# -- S3: moto's server over real HTTP on loopback, one for the whole session ------------------

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1; yields its endpoint URL."""

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_s3: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """s3fs/boto3 pointed at moto through the environment (credentials, endpoint, no
    proxies), with no cached s3fs instance from another test; yields the endpoint."""

    for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": moto_s3}.items():
        monkeypatch.setenv(name, value)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    return moto_s3


# -- loopback only ------------------------------------------------------------------------------


def _is_loopback(host: object) -> bool:
    text = str(host).split("%")[0].strip("[]")
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return text == "localhost" or text.endswith(".localhost")


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test may contact 127.0.0.0/8 and ::1 only: connecting or sending to any other
    address, or asking DNS for any other name, fails the test before a packet leaves (the
    private and public addresses some tests name are only checked, never contacted).
    Covers this process; the servers the tests start are ours and listen on loopback."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_sendto, real_getaddrinfo = socket.socket.sendto, socket.getaddrinfo

    def check(address: object) -> None:
        if isinstance(address, tuple) and address and not _is_loopback(address[0]):
            raise AssertionError(f"a test tried to reach {address[0]}: loopback only")

    def connect(self: socket.socket, address: object) -> None:
        check(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        check(address)
        return real_connect_ex(self, address)

    def sendto(self: socket.socket, data: bytes, *args: object) -> int:
        check(args[-1])
        return real_sendto(self, data, *args)

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
        if host is not None and not _is_loopback(host):
            try:
                ipaddress.ip_address(str(host).split("%")[0].strip("[]"))
            except ValueError:  # a name: resolving it could send a DNS query
                raise AssertionError(f"a test tried to resolve {host!r}: loopback only") from None
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket.socket, "sendto", sendto)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
