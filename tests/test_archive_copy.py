"""The copy: every file of an output into storage, all or nothing, verified, recorded once."""

from __future__ import annotations

import threading
import tracemalloc
from pathlib import Path

import psycopg
import pytest
from archive_helpers import (
    Behaviour,
    completed_row,
    images,
    media_server,
    media_sha256,
    row,
    video,
)

from renderqueue_pipeline.archive import (
    ArchiveOptions,
    ArchiveStorage,
    archive_health,
    archive_pending,
)
from renderqueue_pipeline.archive.core import ArchivedFile, RowOutcome, record_outcome
from renderqueue_pipeline.archive.fetch import FetchPolicy, parse_hosts
from renderqueue_pipeline.db.connect import connect


@pytest.fixture
def origin():
    with media_server("127.0.0.1") as server:
        yield server


@pytest.fixture
def storage(tmp_path: Path) -> ArchiveStorage:
    return ArchiveStorage.from_url(f"file://{tmp_path / 'archive'}")


def run(ledger_url: str, storage: ArchiveStorage, origin, **options) -> object:
    policy = FetchPolicy(loopback_hosts=parse_hosts(origin.netloc))
    return archive_pending(lambda: connect(ledger_url), storage, policy, ArchiveOptions(**options))


def make_due(conn: psycopg.Connection, request_id: str) -> None:
    """Skip the backoff wait (as if its time had come)."""
    conn.execute(
        "update generations set archive_next_attempt_at = now() - interval '1 second' "
        "where request_id = %s",
        (request_id,),
    )
    conn.commit()


def stored_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "archive").rglob("*") if p.is_file())


def test_a_completed_video_is_archived_with_size_and_sha256(
    conn, ledger_url, storage, origin, tmp_path
) -> None:
    size = 3 * 1024 * 1024 + 17
    rid = completed_row(
        conn, video(origin.serve("/files/a/output.mp4", Behaviour(size=size)), size)
    )
    assert row(conn, rid)["archive_status"] == "pending"
    report = run(ledger_url, storage, origin)
    assert (report.archived, report.bytes) == (1, size)

    r = row(conn, rid)
    created = r["created_at"]
    final = (
        tmp_path
        / "archive"
        / "generations"
        / f"{created:%Y}"
        / f"{created:%m}"
        / rid
        / "output.mp4"
    )
    assert r["archive_status"] == "archived"
    assert r["archive_url"] == f"file://{final}"
    assert r["archive_bytes"] == size
    assert r["archive_sha256"] == media_sha256("/files/a/output.mp4", size)
    assert r["archive_attempts"] == 1
    assert r["archived_at"] is not None
    assert stored_files(tmp_path) == [final]  # nothing left in staging
    assert final.stat().st_size == size

    media = conn.execute("select * from generation_media where request_id = %s", (rid,)).fetchall()
    assert [(m["source"], m["best_url"]) for m in media] == [("archive", f"file://{final}")]
    assert media[0]["fal_url"] == origin.url("/files/a/output.mp4")
    # fal's payload stays as the ledger stored it: our copy is only in the archive columns
    assert origin.url("/files/a/output.mp4") in str(r["outputs"])


def test_every_file_of_an_output_is_archived_under_distinct_names(
    conn, ledger_url, storage, origin, tmp_path
) -> None:
    a = origin.serve("/img/1/image.jpeg", Behaviour(size=2000, content_type="image/jpeg"))
    b = origin.serve("/img/2/image.jpeg", Behaviour(size=3000, content_type="image/jpeg"))
    rid = completed_row(conn, images((a, 2000), (b, 3000)))
    report = run(ledger_url, storage, origin)
    assert report.archived == 1
    assert report.bytes == 5000
    files = conn.execute(
        "select f.* from generation_files f join generations g on g.id = f.generation_id "
        "where g.request_id = %s order by ordinal",
        (rid,),
    ).fetchall()
    assert [(f["ordinal"], f["file_name"], f["bytes"]) for f in files] == [
        (1, "1-image.jpeg", 2000),
        (2, "2-image.jpeg", 3000),
    ]
    assert files[0]["sha256"] == media_sha256("/img/1/image.jpeg", 2000)
    assert files[1]["sha256"] == media_sha256("/img/2/image.jpeg", 3000)
    assert [p.name for p in stored_files(tmp_path)] == ["1-image.jpeg", "2-image.jpeg"]
    media = conn.execute(
        "select ordinal, source, best_url from generation_media "
        "where request_id = %s order by ordinal",
        (rid,),
    ).fetchall()
    assert [m["best_url"] for m in media] == [f["archive_url"] for f in files]


def test_unarchived_rows_link_to_fals_copy(conn, origin) -> None:
    url = origin.url("/later.mp4")
    rid = completed_row(conn, video(url, 10))
    media = conn.execute(
        "select source, best_url from generation_media where request_id = %s", (rid,)
    ).fetchone()
    assert (media["source"], media["best_url"]) == ("fal", url)


@pytest.mark.parametrize("status", [404, 410])
def test_a_file_already_gone_is_lost_at_once_and_never_fetched_again(
    conn, ledger_url, storage, origin, status
) -> None:
    rid = completed_row(conn, video(origin.serve("/gone.mp4", Behaviour(status=status)), 10))
    report = run(ledger_url, storage, origin)
    assert report.lost == 1
    assert report.failures_by_reason == {"gone": 1}
    r = row(conn, rid)
    assert r["archive_status"] == "lost"
    assert r["archive_failure"] == "gone"
    assert str(status) in r["archive_error"]
    assert r["archive_next_attempt_at"] is None
    run(ledger_url, storage, origin)
    assert origin.hits("/gone.mp4") == 1
    assert archive_health(conn)["lost"] == 1
    media = conn.execute(
        "select source, best_url from generation_media where request_id = %s", (rid,)
    ).fetchone()
    assert (media["source"], media["best_url"]) == ("lost", None)


def test_a_mid_stream_disconnect_leaves_no_object_and_is_retried(
    conn, ledger_url, storage, origin, tmp_path
) -> None:
    size = 2 * 1024 * 1024
    url = origin.serve(
        "/cut.mp4", Behaviour(size=size, disconnect_after=size // 2), Behaviour(size=size)
    )
    rid = completed_row(conn, video(url, size))
    report = run(ledger_url, storage, origin)
    assert report.retrying == 1
    assert report.failures_by_reason == {"network": 1}
    r = row(conn, rid)
    assert r["archive_status"] == "pending"
    assert r["archive_failure"] == "network"
    assert r["archive_next_attempt_at"] > conn.execute("select now() as t").fetchone()["t"]
    assert stored_files(tmp_path) == []

    again = run(ledger_url, storage, origin)
    assert again.rows == 0  # not due yet: the backoff holds
    make_due(conn, rid)
    run(ledger_url, storage, origin)
    r = row(conn, rid)
    assert (r["archive_status"], r["archive_attempts"]) == ("archived", 2)
    assert r["archive_sha256"] == media_sha256("/cut.mp4", size)
    assert [p.name for p in stored_files(tmp_path)] == ["output.mp4"]


def test_a_length_that_disagrees_with_fals_file_size_is_an_error(
    conn, ledger_url, storage, origin, tmp_path
) -> None:
    announced = completed_row(conn, video(origin.serve("/a.mp4", Behaviour(size=1000)), 999))
    chunked = completed_row(
        conn, video(origin.serve("/b.mp4", Behaviour(size=1000, content_length=None)), 1001)
    )
    report = run(ledger_url, storage, origin)
    assert report.failures_by_reason == {"length_mismatch": 2}
    for rid, words in ((announced, "Content-Length 1000"), (chunked, "received 1000 bytes")):
        r = row(conn, rid)
        assert (r["archive_status"], r["archive_failure"]) == ("pending", "length_mismatch")
        assert words in r["archive_error"]
    assert stored_files(tmp_path) == []


def test_a_short_body_under_its_content_length_is_not_archived(
    conn, ledger_url, storage, origin, tmp_path
) -> None:
    """The server announces more bytes than it sends, then closes: never a success."""
    rid = completed_row(
        conn, video(origin.serve("/short.mp4", Behaviour(size=1000, content_length=5000)), None)
    )
    run(ledger_url, storage, origin)
    r = row(conn, rid)
    assert r["archive_status"] == "pending"
    assert r["archive_failure"] in (
        "network",
        "length_mismatch",
    )
    assert stored_files(tmp_path) == []


def test_failures_retry_with_backoff_then_fail_after_max_attempts(
    conn, ledger_url, storage, origin
) -> None:
    rid = completed_row(conn, video(origin.serve("/flaky.mp4", Behaviour(status=503)), 10))
    for attempt in (1, 2):
        report = run(ledger_url, storage, origin, max_attempts=3, backoff_seconds=60)
        r = row(conn, rid)
        assert (r["archive_status"], r["archive_attempts"]) == ("pending", attempt)
        wait = conn.execute(
            "select extract(epoch from archive_next_attempt_at - now()) as s "
            "from generations where request_id = %s",
            (rid,),
        ).fetchone()["s"]
        assert 60 * 2 ** (attempt - 1) - 30 < wait <= 60 * 2 ** (attempt - 1)
        assert report.retrying == 1
        make_due(conn, rid)
    report = run(ledger_url, storage, origin, max_attempts=3)
    r = row(conn, rid)
    assert (r["archive_status"], r["archive_attempts"], r["archive_failure"]) == (
        "failed",
        3,
        "http_error",
    )
    assert report.failed == 1
    assert archive_health(conn)["failures_by_reason"] == {"failed:http_error": 1}


def test_the_backoff_never_waits_past_half_the_time_left(conn, ledger_url, storage, origin):
    rid = completed_row(
        conn, video(origin.serve("/soon.mp4", Behaviour(status=500)), 10), expires_in="10 minutes"
    )
    run(ledger_url, storage, origin, backoff_seconds=3600)
    wait = conn.execute(
        "select extract(epoch from archive_next_attempt_at - now()) as s "
        "from generations where request_id = %s",
        (rid,),
    ).fetchone()["s"]
    assert 200 < wait <= 300


def test_rows_nearest_their_deadline_go_first(conn, ledger_url, storage, origin) -> None:
    late = completed_row(
        conn, video(origin.serve("/late.mp4", Behaviour(size=10)), 10), fal_expires_at="2099-01-01"
    )
    never = completed_row(conn, video(origin.serve("/never.mp4", Behaviour(size=10)), 10))
    soon = completed_row(
        conn, video(origin.serve("/soon.mp4", Behaviour(size=10)), 10), fal_expires_at="2098-01-01"
    )
    order = []
    for _ in range(3):
        report = run(ledger_url, storage, origin, limit=1)
        order.append(report.outcomes[0].request_id)
    assert order == [soon, late, never]


def test_two_concurrent_runs_archive_each_row_once(
    conn, ledger_url, storage, origin, tmp_path
) -> None:
    rids = [
        completed_row(conn, video(origin.serve(f"/c{i}.mp4", Behaviour(size=300_000)), 300_000))
        for i in range(8)
    ]
    reports = []
    barrier = threading.Barrier(2)

    def one_run() -> None:
        barrier.wait()
        reports.append(run(ledger_url, storage, origin, concurrency=2))

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(r.archived for r in reports) == 8
    assert sum(r.rows for r in reports) == 8
    for i, rid in enumerate(rids):
        r = row(conn, rid)
        assert (r["archive_status"], r["archive_attempts"]) == ("archived", 1)
        assert origin.hits(f"/c{i}.mp4") == 1
    assert conn.execute("select count(*) as n from generation_files").fetchone()["n"] == 8
    assert len(stored_files(tmp_path)) == 8


def test_a_row_archived_by_another_run_meanwhile_stays_archived_once(
    conn, ledger_url, storage, origin
) -> None:
    """Even when a lease expired and two runs copied the same row, the first record wins."""
    rid = completed_row(conn, video(origin.serve("/twice.mp4", Behaviour(size=100)), 100))
    run(ledger_url, storage, origin)
    first = row(conn, rid)
    # a second run that had claimed the row before the first one recorded it

    late = RowOutcome(
        rid,
        "archived",
        bytes=100,
        files=[
            ArchivedFile(
                1, origin.url("/twice.mp4"), "output.mp4", None, 100, "0" * 64, "file:///elsewhere"
            )
        ],
    )
    assert record_outcome(conn, first, late, ArchiveOptions()).status == "skipped"
    after = row(conn, rid)
    assert (after["archive_url"], after["archive_sha256"], after["archive_attempts"]) == (
        first["archive_url"],
        first["archive_sha256"],
        1,
    )
    assert conn.execute("select count(*) as n from generation_files").fetchone()["n"] == 1


def test_memory_stays_bounded_for_a_large_object(conn, ledger_url, storage, origin) -> None:

    size = 48 * 1024 * 1024
    completed_row(conn, video(origin.serve("/large.mp4", Behaviour(size=size)), size))
    tracemalloc.start()
    try:
        report = run(ledger_url, storage, origin)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.archived == 1
    assert report.bytes == size
    assert peak < 16 * 1024 * 1024, peak


def test_an_output_is_archived_whole_or_not_at_all(
    conn, ledger_url, storage, origin, tmp_path
) -> None:
    """The first image copied fine, the second broke: neither is visible, the row retries."""
    a = origin.serve("/whole/1/image.jpeg", Behaviour(size=4000, content_type="image/jpeg"))
    b = origin.serve(
        "/whole/2/image.jpeg", Behaviour(size=4000, disconnect_after=1000), Behaviour(size=4000)
    )
    rid = completed_row(conn, images((a, 4000), (b, 4000)))
    report = run(ledger_url, storage, origin)
    assert report.retrying == 1
    assert stored_files(tmp_path) == []
    assert conn.execute("select count(*) as n from generation_files").fetchone()["n"] == 0
    make_due(conn, rid)
    run(ledger_url, storage, origin)
    assert row(conn, rid)["archive_status"] == "archived"
    assert [p.name for p in stored_files(tmp_path)] == ["1-image.jpeg", "2-image.jpeg"]
