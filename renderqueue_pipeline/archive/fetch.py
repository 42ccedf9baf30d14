"""Fetching fal's media files safely: allow-listed hosts only, no private addresses, no SSRF.

The rules, in the order a fetch meets them:

1. The URL is http(s) and its host (or host:port) is on the allow list; every redirect
   target is checked again before it is requested.
2. The host is resolved once, each address is checked (`address_refusal`), and the
   connection goes to the address that was checked: a second DNS answer can never
   swap in another address (no DNS rebinding). Private, loopback, link-local, shared,
   multicast, reserved and unspecified addresses are refused; loopback only for hosts
   allowed it explicitly (the local simulator, test servers).
3. A body larger than the maximum (default 2 GiB) is refused, by its announced size
   and again while streaming.
4. A download has a total deadline derived from its expected size and a minimum rate
   (never past the row's lease), and a stall timeout (no byte for that long): a server
   that drips bytes cannot hold a copy slot.

Anything refused raises `Refused` with a reason code and a sentence saying why.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urljoin

import httpcore
import httpx

from renderqueue_pipeline.tls import ssl_context

#: fal's media hosts (outputs are public URLs on its CDN).
DEFAULT_ALLOWED_HOSTS = ("v3.fal.media", "v3b.fal.media", "fal.media")
DEFAULT_MAX_BYTES = 2 * 1024**3
#: the slowest transfer a download may average before its deadline (256 KiB/s = 2 Mbit/s)
DEFAULT_MIN_BYTES_PER_SECOND = 256 * 1024
#: added to every download's deadline: connecting, TLS, the CDN's first byte
DEFAULT_DEADLINE_GRACE_SECONDS = 60.0
#: the longest any download may take: under the archive's 30-minute lease
DEFAULT_MAX_DOWNLOAD_SECONDS = 1800.0 - 60.0
#: no byte for this long: the transfer is broken (retried later)
DEFAULT_STALL_SECONDS = 30.0

Resolver = Callable[[str, int], list[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(Exception):
    """A fetch that did not produce the file; `reason` is a short code stored on the row."""

    reason = "network"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class Refused(FetchError):
    """Our own rules refused the fetch (host, address, size): retrying will not help."""


class Gone(FetchError):
    """fal's CDN says the file no longer exists (404/410): it is lost for good."""

    reason = "gone"


class TooSlow(FetchError):
    """The download did not finish by its deadline (size / minimum rate): retried later."""

    reason = "too_slow"


class LengthMismatch(FetchError):
    """The bytes received disagree with Content-Length or with fal's file_size."""

    reason = "length_mismatch"


# ----- addresses ---------------------------------------------------------------------------------


def address_refusal(address: str | IPAddress) -> str | None:
    """Why this IP address may not be fetched from (None: a public address).

    IPv4-mapped (::ffff:a.b.c.d), 6to4 and Teredo IPv6 addresses are judged by the IPv4
    address inside them (NAT64's 64:ff9b::/96 is inside ::/8, reserved: refused). Site-local
    fec0::/10 (deprecated, still routed inside some networks) is refused although Python
    calls it global.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is not None:
            inner_reason = address_refusal(inner)
            return f"{inner_reason} (inside {ip})" if inner_reason else None
    checks = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip in _SHARED_V4, "shared (carrier-grade NAT)"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "site-local"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (not ip.is_global, "non-global"),
    )
    for hit, kind in checks:
        if hit:
            return f"{kind} address {ip}"
    return None


_SHARED_V4 = ipaddress.ip_network("100.64.0.0/10")


def literal_address(host: str) -> IPAddress | None:
    """The address a host name spells without DNS, in every form the C library accepts.

    `2130706433`, `0177.0.0.1`, `0x7f.1` and `127.1` all mean 127.0.0.1 to inet_aton. A
    trailing dot (`127.0.0.1.`, the fully qualified spelling) is dropped first: the
    resolver would read the same address, so the literal must never reach DNS.
    """
    bare = host.strip("[]")
    if bare.endswith(".") and not bare.endswith(".."):
        bare = bare[:-1]
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(bare))
    except (OSError, ValueError):
        return None


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host (literals never reach DNS)."""
    literal = literal_address(host)
    if literal is not None:
        return [str(literal)]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))  # str: typeshed allows an int


# ----- the policy --------------------------------------------------------------------------------


def _host_key(host: str, port: int | None) -> tuple[str, str]:
    host = host.lower().strip("[]").rstrip(".")
    return host, f"{host}:{port}" if port is not None else host


def _matches(entries: frozenset[str], host: str, port: int) -> bool:
    bare, with_port = _host_key(host, port)
    if bare in entries or with_port in entries:
        return True
    return any(e.startswith("*.") and bare.endswith(e[1:]) and ":" not in e for e in entries)


def parse_hosts(value: str | Iterable[str] | None) -> frozenset[str]:
    """A comma-separated (or iterable) list of host or host:port entries, lowercased."""
    if value is None:
        return frozenset()
    items = value.split(",") if isinstance(value, str) else value
    return frozenset(item.strip().lower().rstrip(".") for item in items if item.strip())


@dataclass(frozen=True)
class FetchPolicy:
    """Which URLs may be fetched, and how big a body may be."""

    allowed_hosts: frozenset[str] = frozenset(DEFAULT_ALLOWED_HOSTS)
    #: host or host:port entries that may resolve to loopback (the simulator, test servers)
    loopback_hosts: frozenset[str] = frozenset()
    max_bytes: int = DEFAULT_MAX_BYTES
    max_redirects: int = 5
    resolver: Resolver = field(default=system_resolver, compare=False)
    #: a download must average at least this many bytes/s (plus the grace) to finish
    min_bytes_per_second: float = DEFAULT_MIN_BYTES_PER_SECOND
    deadline_grace_seconds: float = DEFAULT_DEADLINE_GRACE_SECONDS
    #: the longest any download may take, whatever its size (under the row's lease)
    max_download_seconds: float = DEFAULT_MAX_DOWNLOAD_SECONDS
    #: no byte received (or sent) for this long: the transfer is broken
    stall_seconds: float = DEFAULT_STALL_SECONDS

    def download_seconds(self, size: int | None) -> float:
        """How long a download of `size` bytes may take (unknown size: the longest allowed)."""
        if size is None:
            return self.max_download_seconds
        return min(
            self.max_download_seconds,
            self.deadline_grace_seconds + size / self.min_bytes_per_second,
        )

    def check_url(self, url: httpx.URL | str) -> httpx.URL:
        """The parsed URL, or Refused if its scheme or host is not allowed (before any DNS)."""
        if isinstance(url, str):
            try:
                url = httpx.URL(url)
            except (httpx.InvalidURL, ValueError) as exc:
                raise Refused(f"not a valid URL: {url!r} ({exc})", "bad_url") from None
        if url.scheme not in ("http", "https"):
            raise Refused(f"scheme {url.scheme!r} is not http(s): {url}", "bad_url")
        if not url.host:
            raise Refused(f"no host in {url}", "bad_url")
        port = url.port or (443 if url.scheme == "https" else 80)
        if not (
            _matches(self.allowed_hosts, url.host, port)
            or _matches(self.loopback_hosts, url.host, port)
        ):
            raise Refused(f"host {url.host}:{port} is not on the allow list", "host_not_allowed")
        return url

    def checked_addresses(self, host: str, port: int) -> list[str]:
        """Resolve host once and keep only addresses we may connect to (Refused if none)."""
        try:
            addresses = self.resolver(host, port)
        except OSError as exc:
            raise FetchError(f"cannot resolve {host}: {exc}", "network") from exc
        loopback_ok = _matches(self.loopback_hosts, host, port)
        allowed, reasons = [], []
        for address in addresses:
            reason = address_refusal(address)
            ip = ipaddress.ip_address(address)
            inner = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            if reason and loopback_ok and (ip.is_loopback or (inner and inner.is_loopback)):
                reason = None
            if reason:
                reasons.append(reason)
            else:
                allowed.append(address)
        if not allowed:
            why = "; ".join(reasons) or "no addresses"
            raise Refused(f"{host} resolves to a refused address: {why}", "address_refused")
        return allowed


# ----- the connection: to the address that was checked, within the download's deadline -----------

#: the monotonic moment the current thread's download must be done by (None: no deadline)
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "renderqueue_archive_deadline", default=None
)


@contextlib.contextmanager
def download_deadline(seconds: float) -> Iterator[Callable[[float], None]]:
    """Every socket read and write in this thread must finish within `seconds`.

    Yields a function that moves the deadline to `seconds` from the start (once the
    response's Content-Length is known). Enforced per socket operation, so a server that
    drips a byte at a time (headers or body) is cut off at the deadline, not after it.
    """
    started = time.monotonic()
    token = _deadline.set(started + seconds)

    def tighten(seconds: float) -> None:
        current = _deadline.get()
        _deadline.set(min(current, started + seconds) if current is not None else None)

    try:
        yield tighten
    finally:
        _deadline.reset(token)


def deadline_passed() -> bool:
    """True when this thread's download deadline has passed."""
    deadline = _deadline.get()
    return deadline is not None and time.monotonic() >= deadline


def _bounded(timeout: float | None, operation: str) -> float | None:
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        error = {"read": httpcore.ReadTimeout, "connect": httpcore.ConnectTimeout}.get(
            operation, httpcore.WriteTimeout
        )
        raise error("the download's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose reads and writes never outlast the download's deadline."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, "read"))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bounded(timeout, "write"))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore.NetworkStream:
        return _DeadlineStream(
            self._stream.start_tls(ssl_context, server_hostname, _bounded(timeout, "write"))
        )

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _CheckedBackend(httpcore.NetworkBackend):
    """httpcore's network backend, connecting only to addresses the policy accepted."""

    def __init__(self, policy: FetchPolicy) -> None:
        self._policy = policy
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        last: Exception | None = None
        for address in self._policy.checked_addresses(host, port):
            try:
                return _DeadlineStream(
                    self._backend.connect_tcp(
                        address,
                        port,
                        timeout=_bounded(timeout, "connect"),
                        local_address=local_address,
                        socket_options=socket_options,
                    )
                )
            except httpcore.ConnectError as exc:
                last = exc
        if last is None:  # pragma: no cover - the loop above ran at least once
            raise httpcore.ConnectError(f"no address to connect to for {host}")
        raise last

    def connect_unix_socket(self, *args, **kwargs):  # pragma: no cover - never used
        raise Refused("unix sockets are never fetched", "bad_url")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class CheckedTransport(httpx.HTTPTransport):
    """An httpx transport whose every connection goes through the policy's address check."""

    def __init__(self, policy: FetchPolicy, *, max_connections: int = 16) -> None:
        context = ssl_context()
        super().__init__(verify=context, trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=context,
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
            network_backend=_CheckedBackend(policy),
        )


def make_client(policy: FetchPolicy, *, concurrency: int = 4) -> httpx.Client:
    """A client for fetch_stream: no proxies from the environment, no automatic redirects.

    Its read/write timeout is the policy's stall timeout (no byte for that long).
    """
    return httpx.Client(
        transport=CheckedTransport(policy, max_connections=max(4, concurrency * 2)),
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(policy.stall_seconds, connect=min(10.0, policy.stall_seconds)),
        headers={"accept-encoding": "identity", "user-agent": "renderqueue-archive"},
    )


# ----- the download ------------------------------------------------------------------------------


@dataclass
class Download:
    """An open download whose body has not been read yet."""

    url: str
    content_length: int | None
    content_type: str | None
    chunks: Iterator[bytes]


def _body(response: httpx.Response, url: str, max_bytes: int) -> Iterator[bytes]:
    received = 0
    try:
        for chunk in response.iter_raw():
            received += len(chunk)
            if received > max_bytes:
                raise Refused(f"{url} is larger than the maximum of {max_bytes} bytes", "too_large")
            yield chunk
    except httpx.TransportError as exc:
        if deadline_passed():
            raise TooSlow(f"{url}: not finished by its deadline ({received} bytes)") from exc
        raise FetchError(f"{url}: transfer broke after {received} bytes: {exc}") from exc


def open_download(client: httpx.Client, url: str, policy: FetchPolicy, stack) -> Download:
    """Follow redirects (each one re-checked) up to a 200, and return its unread body.

    `stack` is a contextlib.ExitStack that owns the open response.
    """
    current: httpx.URL | str = url
    for _ in range(policy.max_redirects + 1):
        current = policy.check_url(current)
        try:
            response = stack.enter_context(client.stream("GET", current))
        except httpx.TransportError as exc:
            if deadline_passed():
                raise TooSlow(f"{current}: no answer by the download's deadline") from exc
            raise FetchError(f"{current}: {type(exc).__name__}: {exc}") from exc
        if response.is_redirect:
            location = response.headers.get("location")
            response.close()
            if not location:
                raise FetchError(f"{current}: redirect without a Location", "http_error")
            current = urljoin(str(current), location)
            continue
        if response.status_code in (404, 410):
            raise Gone(
                f"fal's CDN answered {response.status_code} for {current}: the file "
                "expired or was deleted"
            )
        if response.status_code != 200:
            raise FetchError(f"{current}: HTTP {response.status_code}", "http_error")
        encoding = response.headers.get("content-encoding", "identity").lower()
        if encoding not in ("", "identity"):
            raise FetchError(f"{current}: unexpected Content-Encoding {encoding!r}", "http_error")
        length = response.headers.get("content-length")
        try:
            content_length = int(length) if length is not None else None
        except ValueError:
            raise FetchError(f"{current}: bad Content-Length {length!r}", "http_error") from None
        if content_length is not None and content_length > policy.max_bytes:
            raise Refused(
                f"{current} announces {content_length} bytes, more than the maximum "
                f"of {policy.max_bytes}",
                "too_large",
            )
        return Download(
            str(current),
            content_length,
            response.headers.get("content-type"),
            _body(response, str(current), policy.max_bytes),
        )
    raise FetchError(f"{url}: more than {policy.max_redirects} redirects", "http_error")
