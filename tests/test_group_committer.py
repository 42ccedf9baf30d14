"""The webhook receiver's group commit on its own: flusher threads against a real Postgres."""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest

from renderqueue_pipeline.errors import DatabaseUnavailable
from renderqueue_pipeline.ledger import LedgerEvent, record_events
from renderqueue_pipeline.webhook.committer import GroupCommitter
from tests.ledger_helpers import generation, submit_row, video_payload


def _flusher_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flusher-")]


@pytest.mark.parametrize("flushers", [1, 3])
def test_concurrent_events_are_each_stored_once_in_shared_commits(
    conn: psycopg.Connection, ledger_url: str, flushers: int
) -> None:
    ids = [submit_row(conn)[0] for _ in range(40)]
    commits: list[tuple[int, float]] = []
    events = [LedgerEvent(r, "completed", video_payload(5)) for r in ids]
    events += events[:10]  # redelivered: the same event again

    async def run() -> list[str]:
        committer = GroupCommitter(
            ledger_url,
            flushers=flushers,
            max_wait=0.005,
            on_commit=lambda n, s: commits.append((n, s)),
        )
        await committer.start()
        try:
            return await asyncio.gather(*(committer.submit(e) for e in events))
        finally:
            await committer.stop()

    outcomes = asyncio.run(run())
    assert outcomes[:40] == ["applied"] * 40
    # a redelivery in the same batch as its original, or in a later one: never applied twice
    assert set(outcomes[40:]) == {"duplicate"}
    assert sum(n for n, _ in commits) == 50
    assert len(commits) < 50
    stored = conn.execute(
        "select count(*) as n, count(distinct request_id) as ids from generation_events "
        "where request_id = any(%s)",
        (ids,),
    ).fetchone()
    assert stored == {"n": 40, "ids": 40}
    assert _flusher_threads() == []


def test_stop_answers_every_queued_event_before_the_threads_end(
    conn: psycopg.Connection, ledger_url: str
) -> None:
    ids = [submit_row(conn)[0] for _ in range(20)]

    async def run() -> list[str]:
        committer = GroupCommitter(ledger_url, max_wait=0.05)
        await committer.start()
        waiting = [
            asyncio.ensure_future(committer.submit(LedgerEvent(r, "completed", video_payload())))
            for r in ids
        ]
        await asyncio.sleep(0)  # all queued, the flusher still gathering
        await committer.stop()
        assert all(task.done() for task in waiting)
        return [task.result() for task in waiting]

    assert asyncio.run(run()) == ["applied"] * 20
    assert _flusher_threads() == []


def test_an_event_after_stop_is_refused_not_left_waiting(ledger_url: str) -> None:
    async def run() -> None:
        committer = GroupCommitter(ledger_url)
        await committer.start()
        await committer.stop()
        with pytest.raises(DatabaseUnavailable, match="shutting down"):
            await asyncio.wait_for(
                committer.submit(LedgerEvent("req-late", "completed", video_payload())), 5
            )

    asyncio.run(run())


def test_an_unreachable_database_fails_the_batch_not_the_flusher(ledger_url: str) -> None:
    unreachable = psycopg.conninfo.make_conninfo(ledger_url, port=1, connect_timeout=2)

    async def run() -> None:
        committer = GroupCommitter(unreachable)
        await committer.start()
        try:
            for _ in range(2):  # the flusher thread survives the first failure
                with pytest.raises(Exception, match="cannot reach the ledger database"):
                    await committer.submit(LedgerEvent("req-x", "completed", video_payload()))
        finally:
            await committer.stop()

    asyncio.run(run())
    assert _flusher_threads() == []


def test_a_batch_stuck_on_a_row_lock_is_cancelled_then_retried(
    conn: psycopg.Connection, ledger_url: str
) -> None:
    request_id, _ = submit_row(conn)
    event = LedgerEvent(request_id, "completed", video_payload())

    async def deliver() -> str:
        committer = GroupCommitter(ledger_url, commit_timeout=0.3)
        await committer.start()
        try:
            return await committer.submit(event)
        finally:
            await committer.stop()

    with psycopg.connect(ledger_url) as other:  # e.g. an operator's open transaction
        other.execute("select 1 from generations where request_id = %s for update", (request_id,))
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match=r"took over 0.3 s .*cancelled"):
            asyncio.run(deliver())
        assert time.monotonic() - started < 5
        assert generation(conn, request_id)["status"] == "submitted"
    # the lock is gone: fal's retry of the same delivery lands
    assert asyncio.run(deliver()) == "applied"
    assert generation(conn, request_id)["status"] == "completed"


def test_batches_of_the_same_requests_in_opposite_orders_never_deadlock(
    conn: psycopg.Connection, ledger_url: str
) -> None:
    """rq_record_events takes its locks in request_id order whatever order events come in."""
    ids = [submit_row(conn)[0] for _ in range(30)]
    rounds = 15
    failures: list[BaseException] = []

    def writer(order: list[str], offset: int) -> None:
        try:
            with psycopg.connect(ledger_url, autocommit=True) as own:
                for n in range(rounds):  # a distinct event per request each round
                    record_events(
                        own,
                        [LedgerEvent(r, "failed", error=f"w{offset}-{n}") for r in order],
                    )
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [
        threading.Thread(target=writer, args=(ids, 0)),
        threading.Thread(target=writer, args=(ids[::-1], 1)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    stored = conn.execute(
        "select count(*) as n from generation_events where request_id = any(%s)", (ids,)
    ).fetchone()
    assert stored["n"] == 30 * rounds * 2  # every distinct event kept, none lost
