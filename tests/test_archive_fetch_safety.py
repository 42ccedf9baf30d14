"""Fetch safety: allow-listed hosts only, checked addresses, re-checked redirects.

Nothing here sends a packet anywhere but loopback: the address rules are tested on
their own (no connection), and the refusal path end to end only with loopback servers
that are NOT on the allow list, a canary on 127.0.0.2 that must see no connection. The
private and public addresses named below are only ever checked, never contacted:
conftest's `loopback_only` guard fails any test that tries to connect to, send to or
resolve anything but loopback.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from pathlib import Path

import psycopg
import pytest
from archive_helpers import Behaviour, completed_row, media_server, row, video

from renderqueue_pipeline.archive import ArchiveOptions, ArchiveStorage, archive_pending
from renderqueue_pipeline.archive.fetch import (
    FetchPolicy,
    Refused,
    address_refusal,
    literal_address,
    parse_hosts,
    system_resolver,
)
from renderqueue_pipeline.db.connect import connect


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No socket may connect, send or resolve at all, not even to loopback: the tests that
    name private, link-local or public addresses only check them, and this proves it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"an address check touched the network: {args[1:]!r}")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.usefixtures("no_network")
def test_the_no_network_guard_stops_even_a_loopback_connection() -> None:
    with socket.socket() as sock, pytest.raises(AssertionError, match="touched the network"):
        sock.connect(("127.0.0.1", 9))


REFUSED = [
    "169.254.169.254",  # cloud metadata (link-local)
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",  # carrier-grade NAT
    "fd00::1",  # unique local
    "::ffff:10.0.0.1",  # IPv4-mapped private
    "::ffff:127.0.0.1",
    "0.0.0.0",  # noqa: S104 - an address the fetcher must refuse, not a bind
    "::",
    "127.0.0.1",
    "::1",
    "fe80::1",
    "224.0.0.1",
    "240.0.0.1",
    "2002:0a00:0001::1",  # 6to4 wrapping 10.0.0.1
    "fec0::1",  # deprecated site-local (Python calls it global)
    "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",  # the last site-local address
    "64:ff9b::a00:1",  # NAT64 wrapping 10.0.0.1 (inside ::/8, reserved)
]


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("address", REFUSED)
def test_private_and_special_addresses_are_refused(address: str) -> None:
    assert address_refusal(address) is not None


def _special_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Every special-purpose range Python's ipaddress module knows, v4 and v6."""
    found = []
    for constants in (ipaddress._IPv4Constants, ipaddress._IPv6Constants):
        for name, value in vars(constants).items():
            if not name.startswith("_") or name.startswith("__"):
                continue
            for item in value if isinstance(value, list) else [value]:
                found.append(ipaddress.ip_network(item))
    return found


@pytest.mark.usefixtures("no_network")
def test_every_range_python_knows_as_not_global_is_refused() -> None:
    """First, last and a middle address of each range: refused unless Python calls it global."""
    networks = _special_networks()
    assert len(networks) > 20  # the module's lists were found
    missed = []
    for network in networks:
        first, last = network.network_address, network.broadcast_address
        middle = ipaddress.ip_address(int(first) + (int(last) - int(first)) // 2)
        for ip in (first, middle, last):
            special = not ip.is_global or (ip.version == 6 and ip.is_site_local)
            if special and address_refusal(ip) is None:
                missed.append(f"{ip} (in {network})")
    assert missed == []


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("address", ["93.184.215.14", "2606:4700:4700::1111"])
def test_public_addresses_pass_the_address_check(address: str) -> None:
    assert address_refusal(address) is None


@pytest.mark.parametrize(
    "spelling", ["2130706433", "0177.0.0.1", "0x7f.0.0.1", "0x7f000001", "127.1", "017700000001"]
)
def test_numeric_spellings_of_loopback_are_read_without_dns_and_refused(spelling: str) -> None:
    assert str(literal_address(spelling)) == "127.0.0.1"
    assert system_resolver(spelling, 80) == ["127.0.0.1"]
    assert "loopback" in address_refusal(system_resolver(spelling, 80)[0])


@pytest.mark.parametrize("spelling", ["127.0.0.1.", "2130706433.", "127.1.", "0x7f.0.0.1."])
def test_a_literal_with_a_trailing_dot_is_read_as_the_address_never_sent_to_dns(
    spelling: str,
) -> None:
    """`127.0.0.1.` is the same address: conftest's guard fails any DNS lookup of it."""
    assert str(literal_address(spelling)) == "127.0.0.1"
    assert system_resolver(spelling, 80) == ["127.0.0.1"]
    assert "loopback" in address_refusal(system_resolver(spelling, 80)[0])


def _resolver(table: dict[str, list[str]], calls: list[str]):
    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        literal = literal_address(host)
        if literal is not None:
            return [str(literal)]
        return table[host]

    return resolve


@pytest.mark.usefixtures("no_network")
def test_a_host_not_on_the_allow_list_is_refused_before_any_dns() -> None:
    calls: list[str] = []
    policy = FetchPolicy(resolver=_resolver({}, calls))
    with pytest.raises(Refused) as refused:
        policy.check_url("https://evil.example/x.mp4")
    assert refused.value.reason == "host_not_allowed"
    for spelling in ("2130706433", "0177.0.0.1", "127.0.0.1", "[::1]", "169.254.169.254"):
        with pytest.raises(Refused):
            policy.check_url(f"http://{spelling}/latest/meta-data/")
    with pytest.raises(Refused) as scheme:
        policy.check_url("file:///etc/passwd")
    assert scheme.value.reason == "bad_url"
    assert calls == []


@pytest.mark.usefixtures("no_network")
def test_an_allowed_name_resolving_to_private_addresses_is_refused() -> None:
    calls: list[str] = []
    policy = FetchPolicy(
        loopback_hosts=parse_hosts("sim.test:8443"),
        resolver=_resolver(
            {"v3.fal.media": ["10.0.0.1", "169.254.169.254"], "sim.test": ["10.0.0.1"]}, calls
        ),
    )
    with pytest.raises(Refused) as refused:
        policy.checked_addresses("v3.fal.media", 443)
    assert refused.value.reason == "address_refused"
    assert "10.0.0.1" in str(refused.value)
    assert "169.254.169.254" in str(refused.value)
    # loopback permission is for loopback only: a private address stays refused
    with pytest.raises(Refused):
        policy.checked_addresses("sim.test", 8443)


@pytest.mark.usefixtures("no_network")
def test_only_the_checked_addresses_are_kept() -> None:
    policy = FetchPolicy(resolver=_resolver({"v3.fal.media": ["10.0.0.1", "93.184.215.14"]}, []))
    assert policy.checked_addresses("v3.fal.media", 443) == ["93.184.215.14"]


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
    resolver = _resolver({"v3.fal.media": ["127.0.0.2"]}, [])
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
