"""The archive's address checks, with no network at all.

The private, link-local and public addresses named here are only ever checked, never
contacted: every test in this module runs under `no_network` (pytestmark), which fails any
connect, send or name lookup, even to loopback, and the last test here fails any other
test module that names an address other than loopback. The refusal path end to end,
with loopback servers only, is in test_archive_fetch_safety.py.
"""

from __future__ import annotations

import ast
import ipaddress
import socket
from pathlib import Path

import pytest
from archive_helpers import table_resolver

from renderqueue_pipeline.archive.fetch import (
    FetchPolicy,
    Refused,
    address_refusal,
    literal_address,
    parse_hosts,
    system_resolver,
)

pytestmark = pytest.mark.usefixtures("no_network")


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


def test_a_host_not_on_the_allow_list_is_refused_before_any_dns() -> None:
    calls: list[str] = []
    policy = FetchPolicy(resolver=table_resolver({}, calls))
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


def test_an_allowed_name_resolving_to_private_addresses_is_refused() -> None:
    calls: list[str] = []
    policy = FetchPolicy(
        loopback_hosts=parse_hosts("sim.test:8443"),
        resolver=table_resolver(
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


def test_only_the_checked_addresses_are_kept() -> None:
    policy = FetchPolicy(
        resolver=table_resolver({"v3.fal.media": ["10.0.0.1", "93.184.215.14"]}, [])
    )
    assert policy.checked_addresses("v3.fal.media", 443) == ["93.184.215.14"]


# -- the pin: no other test module names an address other than loopback ----------------------

TESTS = Path(__file__).resolve().parent
NO_NETWORK_MODULE = Path(__file__).name


def non_loopback_addresses(source: str) -> list[str]:
    """IP literals in a module's strings that are neither loopback nor the unspecified
    address (`::` is also a separator in text)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                ip = ipaddress.ip_address(node.value.strip("[]"))
            except ValueError:
                continue
            if not ip.is_loopback and not ip.is_unspecified:
                found.append(node.value)
    return found


def module_has_no_network(source: str) -> bool:
    """`pytestmark = pytest.mark.usefixtures("no_network")` at module level."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            return "no_network" in ast.unparse(node.value)
    return False


def test_only_the_no_network_module_names_addresses_other_than_loopback() -> None:
    """Tests talk only to loopback: a private, link-local or public address is named only
    as input to the address checks, in one module whose every test runs with no network."""
    naming = {
        path.name: non_loopback_addresses(path.read_text())
        for path in sorted(TESTS.glob("*.py"))
        if non_loopback_addresses(path.read_text())
    }
    assert set(naming) == {NO_NETWORK_MODULE}, naming
    assert module_has_no_network((TESTS / NO_NETWORK_MODULE).read_text())


def test_the_address_finder_sees_private_and_public_literals_only() -> None:
    source = 'A = ["10.0.0.1", "[fd00::1]", "127.0.0.2", "::1", "::", "93.184.215.14", "x"]'
    assert non_loopback_addresses(source) == ["10.0.0.1", "[fd00::1]", "93.184.215.14"]
    assert not module_has_no_network(source)
    assert module_has_no_network('pytestmark = pytest.mark.usefixtures("no_network")')
