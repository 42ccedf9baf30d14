"""Fetch safety: allow-listed hosts only, checked addresses, re-checked redirects.

Nothing here sends a packet anywhere but loopback, and no address but loopback is named:
the address rules are tested on their own, with no network at all, in
test_archive_address_checks.py; here the refusal path runs end to end only with loopback
servers that are NOT on the allow list, a canary on 127.0.0.2 that must see no connection.
conftest's `loopback_only` guard fails any test that tries to connect to, send to or
resolve anything but loopback.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from archive_helpers import Behaviour, completed_row, media_server, row, table_resolver, video

from renderqueue_pipeline.archive import ArchiveOptions, ArchiveStorage, archive_pending
from renderqueue_pipeline.archive.fetch import (
    FetchPolicy,
    parse_hosts,
)
from renderqueue_pipeline.db.connect import connect

# ----- end to end, loopback only -----------------------------------------------------------------


@pytest.fixture
def canary():
    with media_server("127.0.0.2") as server:
        server.serve("/secret", Behaviour(size=100))
        yield server


@pytest.fixture
def origin():
    with media_server("127.0.0.1") as server:
        yield server


def _archive(conn: psycopg.Connection, ledger_url: str, tmp_path: Path, policy: FetchPolicy):

    storage = ArchiveStorage.from_url(f"file://{tmp_path / 'archive'}")
    return archive_pending(lambda: connect(ledger_url), storage, policy, ArchiveOptions())


def _assert_refused(conn, request_id: str, reason: str, tmp_path: Path) -> dict:
    r = row(conn, request_id)
    assert r["archive_status"] == "failed"
    assert r["archive_failure"] == reason
    assert r["archive_error"]
    assert r["archive_attempts"] == 1
    assert r["archive_next_attempt_at"] is None  # refused: never retried in a loop
    assert not list((tmp_path / "archive").rglob("*.mp4"))
    return r


def test_a_url_to_a_host_not_on_the_list_never_reaches_it(
    conn, ledger_url, tmp_path, canary, origin
) -> None:
    rid = completed_row(conn, video(canary.url("/secret"), 100))
    policy = FetchPolicy(loopback_hosts=parse_hosts(origin.netloc))
    report = _archive(conn, ledger_url, tmp_path, policy)
    assert report.failed == 1
    assert report.failures_by_reason == {"host_not_allowed": 1}
    r = _assert_refused(conn, rid, "host_not_allowed", tmp_path)
    assert "127.0.0.2" in r["archive_error"]
    assert canary.connections == 0


def test_a_redirect_to_a_host_not_on_the_list_is_refused(
    conn, ledger_url, tmp_path, canary, origin
) -> None:
    start = origin.serve("/hop", Behaviour(status=302, location=canary.url("/secret")))
    rid = completed_row(conn, video(start, 100))
    _archive(conn, ledger_url, tmp_path, FetchPolicy(loopback_hosts=parse_hosts(origin.netloc)))
    _assert_refused(conn, rid, "host_not_allowed", tmp_path)
    assert origin.hits("/hop") == 1
    assert canary.connections == 0


def test_an_allowed_name_that_resolves_to_a_refused_address_is_never_connected(
    conn, ledger_url, tmp_path, canary, origin
) -> None:
    """DNS says v3.fal.media is 127.0.0.2 (a rebinding attack): refused after resolution."""
    resolver = table_resolver({"v3.fal.media": ["127.0.0.2"]}, [])
    policy = FetchPolicy(loopback_hosts=parse_hosts(origin.netloc), resolver=resolver)
    direct = completed_row(conn, video(f"http://v3.fal.media:{canary.port}/secret", 100))
    redirect = completed_row(
        conn,
        video(
            origin.serve(
                "/hop2", Behaviour(status=307, location=f"http://v3.fal.media:{canary.port}/secret")
            ),
            100,
        ),
    )
    _archive(conn, ledger_url, tmp_path, policy)
    for rid in (direct, redirect):
        r = _assert_refused(conn, rid, "address_refused", tmp_path)
        assert "loopback address 127.0.0.2" in r["archive_error"]
    assert origin.hits("/hop2") == 1
    assert canary.connections == 0


def test_loopback_needs_the_exact_host_and_port(conn, ledger_url, tmp_path, origin) -> None:
    """Allowing the simulator's port does not allow another service on the same address."""
    with media_server("127.0.0.1") as other:
        url = other.serve("/x.mp4", Behaviour(size=10))
        rid = completed_row(conn, video(url, 10))
        _archive(conn, ledger_url, tmp_path, FetchPolicy(loopback_hosts=parse_hosts(origin.netloc)))
        _assert_refused(conn, rid, "host_not_allowed", tmp_path)
        assert other.connections == 0


def test_an_object_over_the_maximum_size_is_refused(conn, ledger_url, tmp_path, origin) -> None:
    announced = completed_row(conn, video(origin.serve("/big.mp4", Behaviour(size=5000)), None))
    chunked = completed_row(
        conn,
        video(origin.serve("/big-chunked.mp4", Behaviour(size=5000, content_length=None)), None),
    )
    policy = FetchPolicy(loopback_hosts=parse_hosts(origin.netloc), max_bytes=4096)
    report = _archive(conn, ledger_url, tmp_path, policy)
    assert report.failures_by_reason == {"too_large": 2}
    for rid in (announced, chunked):
        _assert_refused(conn, rid, "too_large", tmp_path)
    assert not list((tmp_path / "archive").rglob("*big*"))


def test_a_trailing_dot_loopback_host_not_allowed_loopback_never_reaches_it(
    conn, ledger_url, tmp_path, canary
) -> None:
    """`127.0.0.2.` on the host list, but not a loopback entry: refused, the canary sees nothing."""
    rid = completed_row(conn, video(f"http://127.0.0.2.:{canary.port}/secret", 100))
    policy = FetchPolicy(allowed_hosts=parse_hosts(f"127.0.0.2:{canary.port}"))
    _archive(conn, ledger_url, tmp_path, policy)
    r = _assert_refused(conn, rid, "address_refused", tmp_path)
    assert "loopback address 127.0.0.2" in r["archive_error"]
    assert canary.connections == 0


def test_an_allowed_loopback_host_spelled_with_a_trailing_dot_is_fetched(
    conn, ledger_url, tmp_path, origin
) -> None:
    origin.serve("/dot.mp4", Behaviour(size=300))
    rid = completed_row(conn, video(f"http://127.0.0.1.:{origin.port}/dot.mp4", 300))
    _archive(conn, ledger_url, tmp_path, FetchPolicy(loopback_hosts=parse_hosts(origin.netloc)))
    assert row(conn, rid)["archive_status"] == "archived"


# ----- deadlines: a slow server cannot hold a copy slot ------------------------------------------


def _archive_with(conn, ledger_url, tmp_path, policy: FetchPolicy, options: ArchiveOptions):

    storage = ArchiveStorage.from_url(f"file://{tmp_path / 'archive'}")
    started = time.monotonic()
    report = archive_pending(lambda: connect(ledger_url), storage, policy, options)
    return report, time.monotonic() - started


def test_a_server_dripping_bytes_is_cut_off_at_the_download_deadline(
    conn, ledger_url, tmp_path, origin
) -> None:
    """200 bytes at 20 bytes/s would take 10 s; the deadline (0.5 s + 200 B at 1 kB/s) is 0.7 s."""
    url = origin.serve("/drip.mp4", Behaviour(size=200, drip_every=0.05))
    rid = completed_row(conn, video(url, 200))
    policy = FetchPolicy(
        loopback_hosts=parse_hosts(origin.netloc),
        min_bytes_per_second=1000,
        deadline_grace_seconds=0.5,
    )
    report, seconds = _archive_with(conn, ledger_url, tmp_path, policy, ArchiveOptions())
    assert report.failures_by_reason == {"too_slow": 1}
    assert seconds < 5, seconds
    r = row(conn, rid)
    assert (r["archive_status"], r["archive_failure"]) == ("pending", "too_slow")  # retried later
    assert r["archive_next_attempt_at"] is not None
    assert not list((tmp_path / "archive").rglob("*.mp4"))


def test_a_download_of_unknown_size_never_outlasts_the_rows_lease(
    conn, ledger_url, tmp_path, origin
) -> None:
    """No file_size, no Content-Length: the deadline is the lease less a minute (1.5 s here)."""
    url = origin.serve("/drip.mp4", Behaviour(size=200, content_length=None, drip_every=0.05))
    completed_row(conn, video(url, None))
    policy = FetchPolicy(loopback_hosts=parse_hosts(origin.netloc))
    options = ArchiveOptions(lease_seconds=61.5)
    report, seconds = _archive_with(conn, ledger_url, tmp_path, policy, options)
    assert report.failures_by_reason == {"too_slow": 1}
    assert 1.4 < seconds < 6, seconds


def test_a_stalled_transfer_fails_after_the_stall_timeout(
    conn, ledger_url, tmp_path, origin
) -> None:
    url = origin.serve("/stall.mp4", Behaviour(size=1000, stall_after=100, stall_for=10))
    rid = completed_row(conn, video(url, 1000))
    policy = FetchPolicy(loopback_hosts=parse_hosts(origin.netloc), stall_seconds=0.5)
    report, seconds = _archive_with(conn, ledger_url, tmp_path, policy, ArchiveOptions())
    assert report.failures_by_reason == {"network": 1}
    assert seconds < 5, seconds
    assert row(conn, rid)["archive_status"] == "pending"
