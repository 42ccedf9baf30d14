"""Least privilege: what each role may and may not do, as a login of that role.

Logins are made with `renderqueue db grant`'s own function and connect with their password
(the embedded server asks every login but its admin for one), so each row of the table is
a real statement run as a real login against the migrated ledger.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from renderqueue_pipeline.db.roles import GrantError, check_password, grant_login, login_url

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
