"""Events waiting for their row: applied in bounded chunks, in one lock order, skipped
past when they cannot be applied, and marked expired when the row never comes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta

import psycopg
import pytest
from click.testing import CliRunner
from ledger_helpers import SEEDANCE, generation, submit_row, video_payload
from psycopg.types.json import Jsonb

from renderqueue_pipeline.cli import main
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.ledger import (
    LedgerEvent,
    apply_waiting_events,
    expired_event_count,
    record_event,
)
from renderqueue_pipeline.reconcile import ReconcileOptions
from renderqueue_pipeline.settings import load_settings

INPUTS = {"prompt": "a red fox in snow", "duration": "5", "resolution": "720p"}
# More locks than the test server's lock table holds in one transaction (measured: 12,000
# advisory locks fit with max_locks_per_transaction = 64 and 100 connections; 20,000 do not).
MANY = 20_000


def waiting_event(conn: psycopg.Connection, request_id: str, **fields: object) -> int:
    """Store a completed event for `request_id` as the receiver does when no row exists."""
    assert record_event(conn, LedgerEvent(request_id, "completed", video_payload())) == "waiting"
    row = conn.execute(
        "select id from generation_events where request_id = %s", (request_id,)
    ).fetchone()
    for column, value in fields.items():
        conn.execute(
            # the column is a keyword argument of this helper, written in the test
            f"update generation_events set {column} = %s where id = %s",  # noqa: S608
            (value, row["id"]),
        )
    conn.commit()
    return row["id"]


def insert_rows_without_triggers(conn: psycopg.Connection, request_ids: list[str]) -> None:
    """Rows that appeared without the insert trigger (a bulk restore): events stay waiting."""
    with conn.transaction():
        conn.execute("set local session_replication_role = replica")
        conn.execute(
            "insert into generations (request_id, user_id, endpoint, inputs) "
            "select r, 1, %s, %s from unnest(%s::text[]) r",
            (SEEDANCE, Jsonb(INPUTS), request_ids),
        )


def own_waiting(conn: psycopg.Connection, prefix: str) -> int:
    return conn.execute(
        "select count(*) as n from generation_events where request_id like %s "
        "and applied_at is null",
        (f"{prefix}%",),
    ).fetchone()["n"]


# -- expiry ---------------------------------------------------------------------------


def test_events_whose_row_never_came_are_expired_after_the_retention(
    conn: psycopg.Connection,
) -> None:
    old = waiting_event(conn, "other-account-1", received_at="2020-01-01T00:00:00Z")
    recent = waiting_event(conn, "unknown-outcome-1")
    outcomes = apply_waiting_events(conn)
    assert outcomes["expired"] == 1
    expired = {
        r["id"]: r["expired_at"]
        for r in conn.execute("select id, expired_at from generation_events order by id")
    }
    assert expired[old] is not None
    assert expired[recent] is None
    assert expired_event_count(conn) == 1
    assert apply_waiting_events(conn)["expired"] == 0  # marked once
    # kept, and applied should the row appear after all
    submit_row(conn, "other-account-1")
    assert generation(conn, "other-account-1")["status"] == "completed"
    assert expired_event_count(conn) == 0


def test_the_retention_is_a_setting(
    conn: psycopg.Connection, ledger_env: str, settings_env: Callable[..., None]
) -> None:

    def retention() -> timedelta:
        """What the reconciler passes down: the setting, read by its entry points."""
        return ReconcileOptions.from_settings(load_settings()).event_retention

    waiting_event(conn, "two-hours-old")
    conn.execute(
        "update generation_events set received_at = now() - interval '2 hours' "
        "where request_id = 'two-hours-old'"
    )
    conn.commit()
    assert apply_waiting_events(conn)["expired"] == 0  # the default: 7 days
    assert apply_waiting_events(conn, retention=retention())["expired"] == 0  # the same
    settings_env(RENDERQUEUE_EVENT_RETENTION_DAYS="0.05")  # 72 minutes
    assert apply_waiting_events(conn, retention=retention())["expired"] == 1


def test_db_status_counts_and_events_waiting_lists_them(
    conn: psycopg.Connection, ledger_env: str
) -> None:
    waiting_event(conn, "from-another-account", received_at="2020-01-01T00:00:00Z")
    waiting_event(conn, "not-yet")
    apply_waiting_events(conn)
    runner = CliRunner()
    status = runner.invoke(main, ["db", "status"])
    assert status.exit_code == 0, status.output
    assert "events waiting for their row: 2 (expired: 1, failing to apply: 0" in status.output
    listed = runner.invoke(main, ["events", "waiting"], env={"COLUMNS": "250"})
    assert listed.exit_code == 0, listed.output
    lines = {
        name: line
        for line in listed.output.splitlines()
        for name in ("from-another-account", "not-yet")
        if name in line
    }
    assert "expired" in lines["from-another-account"]
    assert "another fal account" in (lines["from-another-account"])
    assert "no generation row yet" in lines["not-yet"]


# -- an event that always errors --------------------------------------------------------


@pytest.fixture
def poison(conn: psycopg.Connection) -> Iterator[str]:
    """A request whose row refuses to complete (a constraint), whatever the event says."""
    request_id = f"poison-{uuid.uuid4().hex[:8]}"
    name = "generations_test_poison"
    conn.execute(
        f"alter table generations add constraint {name} "
        f"check (request_id <> '{request_id}' or status <> 'completed') not valid"
    )
    conn.commit()
    try:
        yield request_id
    finally:
        conn.rollback()
        conn.execute(f"alter table generations drop constraint if exists {name}")
        conn.commit()


def test_an_event_that_always_errors_is_skipped_with_its_reason(
    conn: psycopg.Connection, poison: str
) -> None:
    waiting_event(conn, poison)
    waiting_event(conn, "healthy-1")
    insert_rows_without_triggers(conn, [poison, "healthy-1"])
    outcomes = apply_waiting_events(conn)
    assert (outcomes["applied"], outcomes["error"]) == (1, 1)
    assert generation(conn, "healthy-1")["status"] == "completed"
    assert generation(conn, poison)["status"] == "submitted"
    event = conn.execute(
        "select applied_at, apply_error, apply_failed_at from generation_events "
        "where request_id = %s",
        (poison,),
    ).fetchone()
    assert event["applied_at"] is None
    assert event["apply_failed_at"] is not None
    assert "generations_test_poison" in event["apply_error"]
    assert event["apply_error"].startswith("23514: ")  # check_violation
    # tried again on the next pass, once, after the others
    assert apply_waiting_events(conn)["error"] == 1


def test_the_insert_of_a_row_never_fails_for_its_waiting_event(
    conn: psycopg.Connection, poison: str
) -> None:
    waiting_event(conn, poison)
    submit_row(conn, poison)  # the submit path's INSERT succeeds
    assert generation(conn, poison)["status"] == "submitted"
    reason = conn.execute(
        "select apply_error from generation_events where request_id = %s", (poison,)
    ).fetchone()["apply_error"]
    assert "generations_test_poison" in reason


# -- lock order ---------------------------------------------------------------------------


def advisory_locks_held(conn: psycopg.Connection, pid: int, request_id: str) -> int:
    """Granted transaction advisory locks of backend `pid` on `request_id`'s key."""
    return conn.execute(
        "select count(*) as n from pg_locks l, "
        "  (select hashtextextended(%s, 0) as k) key "
        "where l.pid = %s and l.locktype = 'advisory' and l.granted and l.objsubid = 1 "
        "  and l.classid = ((key.k >> 32) & x'ffffffff'::bigint)::oid "
        "  and l.objid = (key.k & x'ffffffff'::bigint)::oid",
        (request_id, pid),
    ).fetchone()["n"]


def waits_for_a_lock(conn: psycopg.Connection, pid: int) -> bool:
    return (
        conn.execute(
            "select count(*) as n from pg_locks where pid = %s and not granted", (pid,)
        ).fetchone()["n"]
        > 0
    )


def run_blocked(ledger_url: str, conn: psycopg.Connection, blocked_request: str, work) -> tuple:
    """Hold `blocked_request`'s lock, start `work(connection)` in a thread, wait until it
    waits for a lock; return (its pid, the thread, the blocker, the worker connection)."""
    blocker = connect(ledger_url)
    blocker.execute("select pg_advisory_xact_lock(hashtextextended(%s, 0))", (blocked_request,))
    worker = connect(ledger_url)
    pid = worker.execute("select pg_backend_pid() as pid").fetchone()["pid"]
    worker.commit()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            work(worker)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not waits_for_a_lock(conn, pid):
        assert thread.is_alive(), errors
        assert time.monotonic() < deadline, "the worker never waited for the held lock"
        time.sleep(0.05)
    return pid, thread, blocker, worker, errors


@pytest.mark.parametrize("path", ["apply_waiting_events", "one INSERT of many rows"])
def test_waiting_events_take_request_locks_in_the_receivers_order(
    conn: psycopg.Connection, ledger_url: str, path: str
) -> None:
    """The receiver locks requests in sorted order; so must every other writer, or the two
    deadlock. Event ids (and insert order) run z before a; the lock of `a` is held: a
    writer in sorted order waits for `a` holding nothing of `z`."""
    tag = uuid.uuid4().hex[:6]
    first, second = f"z-{tag}", f"a-{tag}"
    waiting_event(conn, first)
    waiting_event(conn, second)
    if path == "apply_waiting_events":
        insert_rows_without_triggers(conn, [first, second])

        def work(c: psycopg.Connection) -> None:
            apply_waiting_events(c)
    else:

        def work(c: psycopg.Connection) -> None:
            with c.transaction():
                c.execute(
                    "insert into generations (request_id, user_id, endpoint, inputs) "
                    "values (%s, 1, %s, %s), (%s, 1, %s, %s)",
                    (first, SEEDANCE, Jsonb(INPUTS), second, SEEDANCE, Jsonb(INPUTS)),
                )

    pid, thread, blocker, worker, errors = run_blocked(ledger_url, conn, second, work)
    try:
        assert advisory_locks_held(conn, pid, first) == 0
    finally:
        blocker.rollback()
        thread.join(timeout=60)
        blocker.close()
        worker.close()
    assert not errors
    assert not thread.is_alive()
    conn.commit()
    assert generation(conn, first)["status"] == generation(conn, second)["status"] == "completed"


# -- bounded locks --------------------------------------------------------------------------


def many_waiting_events(conn: psycopg.Connection, prefix: str, count: int) -> None:
    conn.execute(
        "insert into generation_events (request_id, source, kind, payload) "
        "select %s || n, 'webhook', 'completed', %s from generate_series(1, %s) n",
        (prefix, Jsonb(video_payload()), count),
    )
    conn.commit()


@pytest.mark.slow
def test_apply_waiting_events_stays_inside_the_lock_table(conn: psycopg.Connection) -> None:
    prefix = f"many-{uuid.uuid4().hex[:6]}-"
    many_waiting_events(conn, prefix, MANY)
    insert_rows_without_triggers(conn, [f"{prefix}{n}" for n in range(1, MANY + 1)])
    assert apply_waiting_events(conn, limit=MANY)["applied"] == MANY
    assert own_waiting(conn, prefix) == 0


def test_one_insert_of_many_rows_applies_their_events_inside_the_lock_table(
    conn: psycopg.Connection,
) -> None:
    prefix = f"bulk-{uuid.uuid4().hex[:6]}-"
    many_waiting_events(conn, prefix, MANY)
    conn.execute(
        "insert into generations (request_id, user_id, endpoint, inputs) "
        "select %s || n, 1, %s, %s from generate_series(1, %s) n",
        (prefix, SEEDANCE, Jsonb(INPUTS), MANY),
    )
    conn.commit()
    assert own_waiting(conn, prefix) == 0
    completed = conn.execute(
        "select count(*) as n from generations where request_id like %s and status = 'completed'",
        (f"{prefix}%",),
    ).fetchone()["n"]
    assert completed == MANY
