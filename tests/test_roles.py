"""Least privilege: what each role may and may not do, as a login of that role.

Logins are made with `renderqueue db grant`'s own function and connect with their password
(the embedded server asks every login but its admin for one), so each row of the table is
a real statement run as a real login against the migrated ledger.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from renderqueue_pipeline.cli import main
from renderqueue_pipeline.db.migrate import MigrationError, load_migrations, migrate, sql_dir
from renderqueue_pipeline.db.roles import (
    DEV_LOGINS,
    GrantError,
    check_password,
    dev_logins,
    grant_login,
    login_url,
)
from renderqueue_pipeline.db.server import with_database
from renderqueue_pipeline.simulator.testing import wait_until

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def logins(ledger_url: str) -> Iterator[dict[str, str]]:
    """A login per part (unique names: roles are cluster-wide), dropped afterwards."""
    suffix = uuid.uuid4().hex[:8]
    names = {part: f"rq_test_{part}_{suffix}" for part in ("receiver", "pipeline", "analyst")}
    for part, name in names.items():
        grant_login(ledger_url, part, name, PASSWORD)
    yield {part: login_url(ledger_url, name, PASSWORD) for part, name in names.items()}
    with psycopg.connect(ledger_url, autocommit=True) as conn:
        database = conn.execute("select current_database()").fetchone()[0]
        for name in names.values():
            conn.execute(
                sql.SQL("revoke connect on database {} from {}").format(
                    sql.Identifier(database), sql.Identifier(name)
                )
            )
            conn.execute(sql.SQL("drop role {}").format(sql.Identifier(name)))


EVENT = """select * from rq_record_events('[{"request_id": "req-roles-1", "source": "webhook",
  "kind": "completed", "payload": {"video": {"url": "https://v3.fal.media/x.mp4"}},
  "error": null, "gateway_request_id": null}]'::jsonb)"""

# (part, what, statement, allowed)
TABLE = [
    # the webhook receiver: its one write function, and the reads it needs, nothing else
    ("receiver", "records and applies an event", EVENT, True),
    ("receiver", "reads request ids", "select request_id from generations", True),
    (
        "receiver",
        "reads the waiting-event gauges",
        "select count(*) from generation_events "
        "where applied_at is null and expired_at is not null",
        True,
    ),
    ("receiver", "reads the schema version", "select version from schema_migrations", True),
    ("receiver", "cannot read whole generation rows", "select inputs from generations", False),
    ("receiver", "cannot read budget alerts", "select * from budget_alerts", False),
    ("receiver", "cannot drop a table", "drop table generations", False),
    ("receiver", "cannot create a table", "create table x (id int)", False),
    ("receiver", "cannot change a budget", "update user_budgets set limit_micros = 0", False),
    (
        "receiver",
        "cannot add a price",
        "insert into prices (endpoint, micros_per_second, default_seconds) values ('x', 1, 5)",
        False,
    ),
    ("receiver", "cannot read billing", "select * from fal_billing_events", False),
    (
        "receiver",
        "cannot write events directly",
        "insert into generation_events (request_id, source, kind) "
        "values ('r', 'webhook', 'completed')",
        False,
    ),
    ("receiver", "cannot change a generation", "update generations set cost_micros = 0", False),
    (
        "receiver",
        "cannot call other ledger functions",
        "select rq_expire_waiting_events('1 day')",
        False,
    ),
    # Dagster jobs and the CLI: rows, not structure
    (
        "pipeline",
        "submits a batch",
        "insert into batches (source, status) values ('roles.csv', 'open') returning id",
        True,
    ),
    (
        "pipeline",
        "writes a generation",
        "insert into generations (request_id, user_id, endpoint, inputs) "
        "values ('req-roles-2', 1, 'fal-ai/x', '{}')",
        True,
    ),
    (
        "pipeline",
        "sets a budget",
        "insert into user_budgets (user_id, month, limit_micros) values (1, '2026-12-01', 5)",
        True,
    ),
    (
        "pipeline",
        "records and delivers a budget alert",
        "insert into budget_alerts (user_id, month, threshold_percent, limit_micros, "
        "limit_source, actual_micros, in_flight_micros) "
        "values (1, '2026-12-01', 50, 5, 'default', 3, 0) returning id",
        True,
    ),
    ("pipeline", "records events", EVENT, True),
    (
        "pipeline",
        "applies waiting events",
        "select * from rq_apply_events(array[]::bigint[])",
        True,
    ),
    ("pipeline", "replaces a report month", "delete from spend_monthly_by_user", True),
    ("pipeline", "cannot create a table", "create table x (id int)", False),
    ("pipeline", "cannot alter a table", "alter table generations add column x int", False),
    ("pipeline", "cannot drop a table", "drop table prices", False),
    (
        "pipeline",
        "cannot create a function",
        "create function rq_x() returns int language sql as 'select 1'",
        False,
    ),
    (
        "pipeline",
        "cannot record a migration",
        "insert into schema_migrations (version, name, checksum) values ('999', 'x', 'x')",
        False,
    ),
    ("pipeline", "cannot grant itself more", "grant renderqueue_analyst to current_user", False),
    ("pipeline", "cannot re-run the grants", "call rq_grant_roles()", False),
    # analysts: read the reports, billing and the generations view; write nothing
    ("analyst", "reads a report table", "select * from spend_monthly_by_user", True),
    ("analyst", "reads the daily report", "select * from spend_daily", True),
    ("analyst", "reads fal's billing", "select * from fal_billing_events", True),
    ("analyst", "reads the billing check", "select * from billing_reconciliation", True),
    ("analyst", "reads prices", "select * from prices", True),
    (
        "analyst",
        "reads the generations view",
        "select user_id, endpoint, cost_micros, batch_id from analyst_generations",
        True,
    ),
    ("analyst", "cannot read prompts", "select inputs from generations", False),
    (
        "analyst",
        "cannot insert a report row",
        "insert into spend_report_months (month, state, "
        "computed_at) values ('2026-01-01', 'open', now())",
        False,
    ),
    ("analyst", "cannot delete billing", "delete from fal_billing_events", False),
    ("analyst", "cannot record an event", EVENT, False),
    ("analyst", "cannot create a table", "create table x (id int)", False),
    (
        "analyst",
        "cannot set a budget",
        "insert into user_budgets (user_id, month, limit_micros) values (1, '2026-12-01', 5)",
        False,
    ),
]


@pytest.mark.parametrize(
    ("part", "statement", "allowed"),
    [pytest.param(part, stmt, ok, id=f"{part}-{what}") for part, what, stmt, ok in TABLE],
)
def test_each_role_may_do_only_what_its_part_needs(
    logins: dict[str, str], part: str, statement: str, allowed: bool
) -> None:
    with psycopg.connect(logins[part]) as conn:
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            assert not allowed, f"{part} was refused: {statement}"
        else:
            assert allowed, f"{part} was allowed: {statement}"
        finally:
            conn.rollback()


def test_a_login_needs_its_password(logins: dict[str, str]) -> None:
    """The embedded server trusts only its admin (a DATABASE_URL server has its own rules)."""
    if os.environ.get("DATABASE_URL"):
        pytest.skip("authentication of a DATABASE_URL server is its own")
    wrong = logins["receiver"].replace(PASSWORD.replace(" ", "%20"), "wrong%20password")
    assert wrong != logins["receiver"]
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong).close()


def test_a_login_is_in_one_part_only(ledger_url: str, logins: dict[str, str]) -> None:
    receiver = psycopg.conninfo.conninfo_to_dict(logins["receiver"])["user"]
    with pytest.raises(GrantError, match="already in renderqueue_receiver"):
        grant_login(ledger_url, "analyst", receiver, PASSWORD)
    with pytest.raises(GrantError, match="superuser"):
        grant_login(ledger_url, "analyst", "postgres", PASSWORD)


def test_password_from_a_mounted_secret_is_trimmed_and_never_echoed() -> None:
    assert check_password("s3cret\n", "RENDERQUEUE_DB_PASSWORD") == "s3cret"
    with pytest.raises(GrantError) as refused:
        check_password("s3c\x1bret", "RENDERQUEUE_DB_PASSWORD")
    assert "RENDERQUEUE_DB_PASSWORD" in str(refused.value)
    assert "s3c" not in str(refused.value)


# -- migrations: the owner's step; later migrations get the rule; roles across databases ------


def test_the_pipeline_login_migrates_nothing_and_is_told_who_may(
    ledger_url: str, logins: dict[str, str], make_database, tmp_path: Path
) -> None:
    assert migrate(logins["pipeline"]) == []  # up to date: only read, no lock, no DDL
    behind = tmp_path / "sql"
    shutil.copytree(sql_dir(), behind)
    (behind / "migrations" / "999_later.sql").write_text("create table rq_test_later (id int);\n")
    with pytest.raises(MigrationError, match="run `renderqueue db migrate` as the database owner"):
        migrate(logins["pipeline"], behind)


def test_a_later_migration_gets_the_grants_and_keeps_the_receivers_entry_point(
    make_database, tmp_path: Path
) -> None:
    url = make_database()
    migrate(url)
    later = tmp_path / "sql"
    shutil.copytree(sql_dir(), later)
    # what an engineer might write: redefine the entry point (CREATE OR REPLACE resets
    # SECURITY DEFINER and its search_path), add a table and a function
    (later / "migrations" / "999_later.sql").write_text(
        "do $$ begin execute replace(replace(pg_get_functiondef("
        "'rq_record_events(jsonb)'::regprocedure), ' SECURITY DEFINER', ''),"
        " ' SET search_path TO ''public'', ''pg_temp''', ''); end $$;\n"
        "create table rq_test_later (id bigserial primary key, note text);\n"
        "create function rq_test_later_fn() returns int language sql as 'select 1';\n"
    )
    assert migrate(url, later) == ["999_later"]
    with psycopg.connect(url) as conn:
        definer, config = conn.execute(
            "select prosecdef, proconfig from pg_proc where proname = 'rq_record_events'"
        ).fetchone()
        assert definer
        assert config == ["search_path=public, pg_temp"]
        checks = conn.execute(
            "select has_table_privilege('renderqueue_pipeline', 'rq_test_later', 'insert'),"
            " has_sequence_privilege('renderqueue_pipeline', 'rq_test_later_id_seq', 'usage'),"
            " has_table_privilege('renderqueue_receiver', 'rq_test_later', 'select'),"
            " has_table_privilege('renderqueue_analyst', 'rq_test_later', 'select'),"
            " has_function_privilege('renderqueue_pipeline', 'rq_test_later_fn()', 'execute'),"
            " has_function_privilege('renderqueue_analyst', 'rq_test_later_fn()', 'execute'),"
            " has_function_privilege('renderqueue_receiver', 'rq_test_later_fn()', 'execute')"
        ).fetchone()
    assert checks == (True, True, False, False, True, False, False)


def _create_roles_block() -> str:
    """The schema's role-creating DO block, as the file has it."""
    text = (sql_dir() / "schema" / "90_roles.sql").read_text()
    start = text.index("do $$")
    return text[start : text.index("$$;", start) + 3]


def test_two_databases_creating_the_roles_at_the_same_moment_both_succeed(
    make_database,
) -> None:
    """Roles are cluster-wide and the migration lock is per database: the second creator
    waits on the first's uncommitted role, then finds it made, and goes on."""
    suffix = uuid.uuid4().hex[:6]
    block = _create_roles_block()
    for role in ("receiver", "pipeline", "analyst"):
        block = block.replace(f"'renderqueue_{role}'", f"'rq_race_{role}_{suffix}'")
    assert block.count(f"_{suffix}'") == 3
    first, second = make_database(), make_database()
    outcome: list[BaseException | None] = []
    with psycopg.connect(first) as a, psycopg.connect(second, autocommit=True) as b:
        a.execute(block)  # created, not committed yet
        pid = b.info.backend_pid

        def run_second() -> None:
            try:
                b.execute(block)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 (reported below)
                outcome.append(exc)

        thread = threading.Thread(target=run_second)
        thread.start()
        wait_until(
            lambda: a.execute(
                "select wait_event_type = 'Lock' from pg_stat_activity where pid = %s", (pid,)
            ).fetchone()[0],
            timeout=10,
        )
        a.commit()
        thread.join(10)
    try:
        assert outcome == [None]
    finally:
        with psycopg.connect(first, autocommit=True) as conn:
            for role in ("receiver", "pipeline", "analyst"):
                conn.execute(f"drop role if exists rq_race_{role}_{suffix}")


def test_the_readmes_analyst_queries_run_as_an_analyst(logins: dict[str, str]) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    queries = re.findall(r"```sql\n(.*?)```", readme, flags=re.S)
    assert queries
    with psycopg.connect(logins["analyst"]) as conn:
        for query in queries:
            conn.execute(query).fetchall()


def test_db_grant_reads_the_password_from_the_environment_and_never_prints_it(
    ledger_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:

    name, secret = f"rq_test_cli_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    monkeypatch.setenv("RENDERQUEUE_DB_PASSWORD", secret + "\n")  # a mounted secret's newline
    try:
        made = CliRunner().invoke(main, ["db", "grant", "analyst", name])
        assert made.exit_code == 0, made.output
        assert f"created login {name} in renderqueue_analyst" in made.output
        assert secret not in made.output
        with psycopg.connect(login_url(ledger_env, name, secret)) as conn:
            assert conn.execute("select current_user").fetchone() == (name,)
        monkeypatch.delenv("RENDERQUEUE_DB_PASSWORD")
        refused = CliRunner().invoke(main, ["db", "grant", "analyst", name], input="")
        assert refused.exit_code == 2
        assert "RENDERQUEUE_DB_PASSWORD is not set and there is no terminal" in refused.output
    finally:
        with psycopg.connect(ledger_env, autocommit=True) as conn:
            database = conn.execute("select current_database()").fetchone()[0]
            conn.execute(
                sql.SQL("revoke connect on database {} from {}").format(
                    sql.Identifier(database), sql.Identifier(name)
                )
            )
            conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(name)))


@pytest.mark.slow
def test_a_managed_postgres_admin_without_superuser_migrates_and_grants(
    admin_url: str, ledger_url: str
) -> None:
    """What a managed Postgres gives you: an admin login with CREATEROLE that owns the
    ledger's database, not a superuser. The roles already exist (another database made
    them), so the admin is first given ADMIN OPTION on them, as docs/security.md says."""
    suffix = uuid.uuid4().hex[:8]
    admin, database, login = f"rq_test_admin_{suffix}", f"rq_test_managed_{suffix}", None
    password = uuid.uuid4().hex
    with psycopg.connect(admin_url, autocommit=True) as su:
        su.execute(
            sql.SQL("create role {} login createrole password {}").format(
                sql.Identifier(admin), sql.Literal(password)
            )
        )
        su.execute(
            sql.SQL("create database {} owner {}").format(
                sql.Identifier(database), sql.Identifier(admin)
            )
        )
        su.execute(
            sql.SQL(
                "grant renderqueue_receiver, renderqueue_pipeline, renderqueue_analyst "
                "to {} with admin option"
            ).format(sql.Identifier(admin))
        )
    url = login_url(with_database(admin_url, database), admin, password)
    try:
        assert migrate(url) == [m.name for m in load_migrations()]
        login = f"rq_test_managed_hook_{suffix}"
        grant_login(url, "receiver", login, PASSWORD)
        with psycopg.connect(login_url(url, login, PASSWORD)) as conn:
            outcomes = conn.execute(EVENT).fetchall()
            assert [row[2] for row in outcomes] == ["waiting"]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("select * from user_budgets")
    finally:
        with psycopg.connect(admin_url, autocommit=True) as su:
            su.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(database))
            )
            for role in (login, admin):
                if role:
                    su.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(role)))


def test_dev_logins_get_fresh_passwords_at_every_start(
    ledger_url: str, dev_logins_lock: None
) -> None:
    """`renderqueue dev` runs the receiver and Dagster as rq_receiver and rq_pipeline; each
    start sets new passwords (written nowhere), so an old URL stops working."""
    first = dev_logins(ledger_url)
    second = dev_logins(ledger_url)
    for part, login in DEV_LOGINS.items():
        with psycopg.connect(second[part]) as conn:
            assert conn.execute("select current_user").fetchone() == (login,)
            member = conn.execute(
                "select pg_has_role(current_user, %s, 'member')", (f"renderqueue_{part}",)
            ).fetchone()
            assert member == (True,)
        if not os.environ.get("DATABASE_URL"):
            with pytest.raises(psycopg.OperationalError, match="password authentication"):
                psycopg.connect(first[part]).close()


def test_late_writes_to_a_closed_month_are_recorded_whichever_role_writes(
    ledger_url: str, logins: dict[str, str]
) -> None:
    """The receiver (through its entry point) and the pipeline (a direct UPDATE) both mark
    the closed month changed for the reports' rebuild, in their own transactions."""
    with psycopg.connect(ledger_url, autocommit=True) as admin:
        admin.execute(
            "insert into generations (request_id, user_id, endpoint, inputs, status,"
            " created_at) values ('req-late-role', 7, 'fal-ai/veo3.1', '{}', 'in_progress',"
            " '2026-02-27T10:00:00Z')"
        )
        before = admin.execute(
            "select coalesce(max(changes), 0) from spend_report_changes where month = '2026-02-01'"
        ).fetchone()[0]
    with psycopg.connect(logins["receiver"]) as receiver:
        receiver.execute(EVENT.replace("req-roles-1", "req-late-role"))
        receiver.commit()
    with psycopg.connect(logins["pipeline"]) as pipeline:
        pipeline.execute("update generations set error = 'note' where request_id = 'req-late-role'")
        pipeline.commit()
    with psycopg.connect(ledger_url, autocommit=True) as admin:
        after = admin.execute(
            "select changes from spend_report_changes where month = '2026-02-01'"
        ).fetchone()[0]
        admin.execute("delete from generation_events where request_id = 'req-late-role'")
        admin.execute("delete from generations where request_id = 'req-late-role'")
    assert after == before + 2
