"""Ledger rules 2-4 under any delivery order: property tests against a real Postgres."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_helpers import SEEDANCE, generation, submit_row, video_payload

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.ledger import (
    LedgerEvent,
    apply_waiting_events,
    event_from_fal_webhook,
    record_event,
    record_events,
    record_intent,
    record_submitted,
)

COMPARED = (
    "status",
    "outputs",
    "error",
    "cost_micros",
    "cost_cents",
    "cost_basis",
    "price_id",
    "billed_seconds",
    "conflict",
    "archive_status",
)
INPUTS = {"prompt": "a red fox in snow", "duration": "5", "resolution": "720p"}
ROW = "row"  # the submit path inserting the generation row, as one more "delivery"


def terminal_event(kind: str, seed: int) -> tuple[str, Any, str | None]:
    if kind == "completed":
        return (
            "completed",
            video_payload(seed, url="https://v3b.fal.media/files/b/x/o.mp4"),
            None,
        )
    if kind == "failed":
        return ("failed", {"detail": [{"msg": "bad prompt"}]}, "Invalid status code: 422")
    return ("canceled", None, None)


def deliver(conn: psycopg.Connection, request_id: str, deliveries: list) -> None:
    """Play deliveries in order: ROW inserts the generation, anything else is an event."""
    for item in deliveries:
        if item == ROW:
            intent = record_intent(conn, user_id=7, endpoint=SEEDANCE, inputs=INPUTS)
            record_submitted(conn, intent, request_id)
        else:
            kind, payload, error = item
            record_event(conn, LedgerEvent(request_id, kind, payload, error, "webhook"))


def final_state(conn: psycopg.Connection, request_id: str) -> dict[str, Any]:
    row = generation(conn, request_id)
    state = {key: row[key] for key in COMPARED}
    state["finished"] = row["finished_at"] is not None
    waiting = conn.execute(
        "select count(*) as n from generation_events where request_id = %s and applied_at is null",
        (request_id,),
    ).fetchone()["n"]
    state["waiting"] = waiting
    return state


@st.composite
def delivery_orders(draw: st.DrawFn) -> tuple[list, list]:
    """(in-order deliveries, the same deliveries duplicated and shuffled)."""
    kind = draw(st.sampled_from(["completed", "failed", "canceled"]))
    seed = draw(st.integers(min_value=0, max_value=2**31))
    terminal = terminal_event(kind, seed)
    in_order: list = [ROW]
    if draw(st.booleans()):
        in_order.append(("in_progress", None, None))
    in_order.append(terminal)
    shuffled: list = [ROW]
    for event in in_order[1:]:
        shuffled += [event] * draw(st.integers(min_value=1, max_value=3))
    shuffled = draw(st.permutations(shuffled))
    return in_order, list(shuffled)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(orders=delivery_orders())
def test_any_order_and_duplication_gives_the_in_order_row(
    conn: psycopg.Connection, orders: tuple[list, list]
) -> None:
    in_order, shuffled = orders
    with conn.transaction(force_rollback=True):
        expected_id, actual_id = f"exp-{uuid.uuid4().hex}", f"act-{uuid.uuid4().hex}"
        deliver(conn, expected_id, in_order)
        deliver(conn, actual_id, shuffled)
        expected, actual = final_state(conn, expected_id), final_state(conn, actual_id)
        assert actual == expected
        assert actual["waiting"] == 0
        assert actual["finished"]
        stored = conn.execute(
            "select count(*) as n from generation_events where request_id = %s", (actual_id,)
        ).fetchone()["n"]
        assert stored == len(in_order) - 1  # duplicates are never stored twice


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kinds=st.lists(
        st.sampled_from(["completed", "failed", "canceled"]), min_size=2, max_size=3, unique=True
    ),
    row_position=st.integers(min_value=0, max_value=3),
)
def test_conflicting_terminal_events_are_kept_and_flagged(
    conn: psycopg.Connection, kinds: list[str], row_position: int
) -> None:
    events = [terminal_event(kind, 5) for kind in kinds]
    deliveries = list(events)
    deliveries.insert(min(row_position, len(deliveries)), ROW)
    with conn.transaction(force_rollback=True):
        request_id = f"conf-{uuid.uuid4().hex}"
        deliver(conn, request_id, deliveries)
        row = generation(conn, request_id)
        status, conflict, expected_outcomes = expected_terminal(kinds)
        assert (row["status"], row["conflict"]) == (status, conflict)
        outcomes = [
            (r["kind"], r["outcome"])
            for r in conn.execute(
                "select kind, outcome from generation_events where request_id = %s order by id",
                (request_id,),
            )
        ]
        assert outcomes == expected_outcomes
        if status != "completed":
            assert row["cost_micros"] == 0


def expected_terminal(kinds: list[str]) -> tuple[str, bool, list[tuple[str, str]]]:
    """Rule 3: the first terminal event wins and a different later one is a flagged
    conflict, except that fal's completion beats a cancel (it finished and is billed)."""
    status, conflict, outcomes = kinds[0], False, [(kinds[0], "applied")]
    for kind in kinds[1:]:
        if status == "canceled" and kind == "completed":
            status, outcome = "completed", "applied"
        elif status == "completed" and kind == "canceled":
            outcome = "stale"
        else:
            conflict, outcome = True, "conflict"
        outcomes.append((kind, outcome))
    return status, conflict, outcomes


def test_event_before_its_row_waits_then_applies_on_insert(conn: psycopg.Connection) -> None:
    request_id = f"early-{uuid.uuid4().hex}"
    outcome = record_event(conn, LedgerEvent(request_id, "completed", video_payload(5)))
    assert outcome == "waiting"
    assert generation(conn, request_id) is None
    submit_row(conn, request_id)
    row = generation(conn, request_id)
    assert row["status"] == "completed"
    assert row["cost_basis"] == "requested"


def test_the_articles_raw_insert_also_applies_waiting_events(conn: psycopg.Connection) -> None:
    record_event(
        conn, LedgerEvent("raw-early", "failed", {"detail": "x"}, "Invalid status code: 422")
    )
    conn.execute(  # the article's submit statement, with psycopg's placeholders
        """insert into generations
             (request_id, user_id, endpoint, inputs, cost_cents, status)
           values (%s, %s, %s, %s, %s, 'submitted')
           on conflict (request_id) do nothing""",
        ("raw-early", 3, SEEDANCE, '{"prompt": "x", "duration": 5}', 152),
    )
    row = generation(conn, "raw-early")
    assert row["status"] == "failed"
    assert row["cost_cents"] == 0
    assert row["error"].startswith("Invalid status code: 422")


def test_duplicates_report_duplicate_and_change_nothing(conn: psycopg.Connection) -> None:
    request_id, _ = submit_row(conn)
    event = LedgerEvent(request_id, "completed", video_payload(5))
    assert record_event(conn, event) == "applied"
    before = generation(conn, request_id)
    assert record_events(conn, [event, event, event]) == ["duplicate"] * 3
    assert generation(conn, request_id) == before


def test_status_never_moves_backwards_even_for_raw_sql(conn: psycopg.Connection) -> None:
    request_id, _ = submit_row(conn)
    record_event(conn, LedgerEvent(request_id, "completed", video_payload(5)))
    with pytest.raises(
        psycopg.errors.CheckViolation, match="is completed and cannot become failed"
    ):
        conn.execute(
            "update generations set status = 'failed' where request_id = %s", (request_id,)
        )
    conn.rollback()
    assert record_event(conn, LedgerEvent(request_id, "in_progress")) == "stale"
    assert generation(conn, request_id)["status"] == "completed"


def test_reconciler_applies_events_whose_row_appeared_later(conn: psycopg.Connection) -> None:
    """A row inserted with the trigger disabled (e.g. a bulk restore) is caught up later."""
    request_id = f"late-{uuid.uuid4().hex}"
    record_event(conn, LedgerEvent(request_id, "completed", video_payload(5)))
    with conn.transaction():
        conn.execute("alter table generations disable trigger generations_apply_waiting")
        submit_row(conn, request_id)
        conn.execute("alter table generations enable trigger generations_apply_waiting")
    assert generation(conn, request_id)["status"] == "submitted"
    assert apply_waiting_events(conn) == {"applied": 1}
    assert generation(conn, request_id)["status"] == "completed"


def test_event_and_row_committed_concurrently_never_miss_each_other(
    conn: psycopg.Connection, ledger_url: str
) -> None:
    """Either commit order: the per-request lock makes the later one see the earlier one."""
    for event_first in (True, False):
        request_id = f"race-{uuid.uuid4().hex}"
        with connect(ledger_url) as event_conn, connect(ledger_url) as row_conn:
            first, second = (event_conn, row_conn) if event_first else (row_conn, event_conn)

            def write(c: psycopg.Connection, request_id: str = request_id) -> None:
                if c is event_conn:
                    c.execute(
                        "select * from rq_record_event(%s, 'webhook', 'completed', %s, null, null)",
                        (request_id, psycopg.types.json.Jsonb(video_payload(5))),
                    )
                else:
                    intent = record_intent(c, user_id=1, endpoint=SEEDANCE, inputs=INPUTS)
                    c.execute(
                        "insert into generations (request_id, user_id, endpoint, inputs, "
                        "batch_item_id) values (%s, 1, %s, %s, %s)",
                        (request_id, SEEDANCE, psycopg.types.json.Jsonb(INPUTS), intent.item_id),
                    )

            write(first)  # holds the request's lock until it commits
            worker = threading.Thread(target=lambda c=second: (write(c), c.commit()))
            worker.start()
            worker.join(timeout=0.5)
            assert worker.is_alive(), "the second writer should wait for the first to commit"
            first.commit()
            worker.join(timeout=10)
        row = generation(conn, request_id)
        assert row["status"] == "completed", f"event_first={event_first}"


def test_a_payload_less_completion_is_filled_in_by_the_result_in_either_order(
    conn: psycopg.Connection,
) -> None:
    """fal's payload_error: completed, output unknown; the fetched result completes the row."""
    bare = LedgerEvent("", "completed", None, "Response payload could not be serialized")
    full = LedgerEvent("", "completed", video_payload(7, url="https://v3b.fal.media/x.mp4"), None)
    rows = []
    for order in ((bare, full), (full, bare)):
        request_id, _ = submit_row(conn)
        for event in order:
            record_event(conn, LedgerEvent(request_id, event.kind, event.payload, event.error))
        rows.append({k: generation(conn, request_id)[k] for k in COMPARED})
    assert rows[0] == rows[1]
    assert rows[0]["cost_micros"] == 5 * 303_400
    assert rows[0]["error"] is None


def test_a_payload_less_completion_keeps_the_estimate(conn: psycopg.Connection) -> None:
    request_id, _ = submit_row(conn)
    body = {
        "request_id": request_id,
        "status": "OK",
        "payload": None,
        "payload_error": "Response payload could not be serialized to JSON",
    }
    record_event(conn, event_from_fal_webhook(body))
    row = generation(conn, request_id)
    assert (row["status"], row["outputs"], row["cost_basis"]) == ("completed", None, "estimate")
    assert row["error"] == "Response payload could not be serialized to JSON"


# -- order independence through the batch path, across two connections -----------------

BARE = ("completed", None, "Response payload could not be serialized")  # fal's payload_error


@st.composite
def two_connection_deliveries(draw: st.DrawFn) -> tuple[list, list, list]:
    """(in-order deliveries, connection A's batches, connection B's batches).

    The same events (with a payload-less completion sometimes, duplicates always possible,
    also inside one batch) shuffled and cut into batches that two connections send at once.
    """
    kind = draw(st.sampled_from(["completed", "failed", "canceled"]))
    events: list = []
    if draw(st.booleans()):
        events.append(("in_progress", None, None))
    if kind == "completed":
        shape = draw(st.sampled_from(["full", "bare", "bare+full"]))
        if "bare" in shape:
            events.append(BARE)
        if "full" in shape:
            events.append(terminal_event("completed", draw(st.integers(0, 2**31))))
    else:
        events.append(terminal_event(kind, 0))
    in_order = [ROW, *events]
    copies = [ROW] + [e for e in events for _ in range(draw(st.integers(1, 3)))]
    shuffled = list(draw(st.permutations(copies)))
    batches: list[list] = []
    while shuffled:
        size = draw(st.integers(1, len(shuffled)))
        batch, shuffled = shuffled[:size], shuffled[size:]
        if ROW in batch:  # the row is inserted on its own, like the submit path does
            batch.remove(ROW)
            batches.append([ROW])
        if batch:
            batches.append(batch)
    sides = [draw(st.booleans()) for _ in batches]
    a = [b for b, side in zip(batches, sides, strict=True) if side]
    b = [b for b, side in zip(batches, sides, strict=True) if not side]
    return in_order, a, b


def send(connection: psycopg.Connection, request_id: str, batches: list[list]) -> None:
    for batch in batches:
        if batch == [ROW]:
            intent = record_intent(connection, user_id=7, endpoint=SEEDANCE, inputs=INPUTS)
            connection.commit()
            record_submitted(connection, intent, request_id)
        else:
            record_events(
                connection,
                [LedgerEvent(request_id, kind, payload, error) for kind, payload, error in batch],
            )


@pytest.fixture
def second_conn(ledger_url: str) -> Iterator[psycopg.Connection]:
    connection = connect(ledger_url)
    try:
        yield connection
    finally:
        connection.rollback()
        connection.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=two_connection_deliveries())
def test_batches_from_two_connections_at_once_give_the_in_order_row(
    conn: psycopg.Connection, second_conn: psycopg.Connection, plan: tuple[list, list, list]
) -> None:
    in_order, batches_a, batches_b = plan
    expected_id, actual_id = f"exp-{uuid.uuid4().hex}", f"two-{uuid.uuid4().hex}"
    deliver(conn, expected_id, in_order)
    conn.commit()
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(connection: psycopg.Connection, batches: list[list]) -> None:
        try:
            start.wait(timeout=30)
            send(connection, actual_id, batches)
        except BaseException as exc:  # noqa: BLE001 - the thread hands every failure to the test
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(conn, batches_a)),
        threading.Thread(target=run, args=(second_conn, batches_b)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    expected, actual = final_state(conn, expected_id), final_state(conn, actual_id)
    conn.commit()
    assert actual == expected
    assert actual["waiting"] == 0
    assert actual["finished"]
    stored = conn.execute(
        "select count(*) as n from generation_events where request_id = %s", (actual_id,)
    ).fetchone()["n"]
    conn.commit()
    assert stored == len(in_order) - 1  # duplicates are never stored twice


def test_the_dedupe_key_ignores_gateway_request_id(conn: psycopg.Connection) -> None:
    """fal changes gateway_request_id when it retries internally: still the same event."""
    request_id, _ = submit_row(conn)
    payload = video_payload()
    first = LedgerEvent(request_id, "completed", payload, None, "webhook", "gw-first")
    retried = LedgerEvent(request_id, "completed", payload, None, "webhook", "gw-second")
    assert record_events(conn, [first]) == ["applied"]
    assert record_events(conn, [retried]) == ["duplicate"]
    stored = conn.execute(
        "select gateway_request_id from generation_events where request_id = %s",
        (request_id,),
    ).fetchall()
    assert [r["gateway_request_id"] for r in stored] == ["gw-first"]


@pytest.mark.parametrize("status", ["failed", "canceled"])
def test_raw_sql_cannot_charge_a_failed_or_canceled_row(
    conn: psycopg.Connection, status: str
) -> None:
    request_id, _ = submit_row(conn)
    conn.execute(
        "update generations set status = %s, cost_cents = 500, cost_basis = 'billed' "
        "where request_id = %s",
        (status, request_id),
    )
    conn.execute("update generations set cost_micros = 99 where request_id = %s", (request_id,))
    row = generation(conn, request_id)
    assert (row["status"], row["cost_micros"], row["cost_cents"], row["cost_basis"]) == (
        status,
        0,
        0,
        "none",
    )
    conn.rollback()


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("in_progress", "submitted"),
        ("completed", "in_progress"),
        ("completed", "submitted"),
        ("failed", "completed"),
        ("failed", "in_progress"),
        ("canceled", "failed"),
    ],
)
def test_raw_sql_cannot_move_a_row_backwards(
    conn: psycopg.Connection, before: str, after: str
) -> None:
    request_id, _ = submit_row(conn)
    conn.execute("update generations set status = %s where request_id = %s", (before, request_id))
    with pytest.raises(psycopg.errors.CheckViolation, match=f"is {before} and cannot become"):
        conn.execute(
            "update generations set status = %s where request_id = %s", (after, request_id)
        )
    conn.rollback()
