"""How the receiver's HTTP server refuses to be held open: no lock-out without a secret.

uvicorn bounds connections (`limit_concurrency`: beyond it every request, `/healthz`
included, gets 503) but gives a connection that never finishes its request head all the
time it wants, and its httptools parser accepts a head of any size. So anyone who can
open sockets could fill the limit with half-sent heads. This protocol adds, per server:

- a head deadline: a request head must be complete `HEADER_TIMEOUT` s after the
  connection opened or its previous answer was sent, or the connection is closed;
- a head size cap: more than `MAX_HEADER_BYTES` of request line and headers gets 431
  and the connection is closed;
- a cap on connections waiting for a head (idle keep-alive ones included): beyond
  `MAX_HEADS_WAITING` the OLDEST is closed, never the newcomer, so a genuine request
  (whose head arrives in milliseconds) always gets in, and those connections alone can
  never reach `limit_concurrency`;
- an answer sent before its request's body was read (a refusal before the body, a slow
  body cut off) closes the connection, so the rest of that body cannot hold it open.

Deadlines are checked by one timer per server every HEAD_CHECK_INTERVAL, not one per
connection: per request the guard costs a dict insert and delete.

The body itself is bounded in the app (`app.py`: a deadline, a minimum rate, and the
oldest reader cut off when too many are being read).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("renderqueue.webhook")

#: a request head must be complete this long after the connection opened (or the last answer)
HEADER_TIMEOUT = 10.0
#: request line and headers, in all (fal sends well under 2 KiB)
MAX_HEADER_BYTES = 32 * 1024
#: connections waiting for a request head at once; beyond it the oldest is closed
MAX_HEADS_WAITING = 512
#: how often the connections waiting for a head are checked against the deadline
HEAD_CHECK_INTERVAL = 0.5
#: how long the rest of a refused head is read and dropped before the connection closes
DRAIN_SECONDS = 2.0
#: idle time between requests on a kept-alive connection (uvicorn's default)
KEEP_ALIVE_SECONDS = 5
#: connections and requests at once per worker (uvicorn answers 503 beyond it)
DEFAULT_LIMIT_CONCURRENCY = 1024

_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\ncontent-length: 32\r\n"
    b"connection: close\r\n\r\nrequest headers over the limit\r\n"
)


async def _headers_too_large(scope: Any, receive: Any, send: Any) -> None:
    """The answer to a complete head over the size cap (the request's fault: 431)."""
    body = b"request headers over the limit\r\n"
    await send(
        {
            "type": "http.response.start",
            "status": 431,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _HeadsWaiting:
    """One server's connections waiting for a request head, oldest first, and one timer
    that closes those past the head deadline (not a timer per connection)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.since: OrderedDict[GuardedHttpToolsProtocol, float] = OrderedDict()
        self.sweeper: asyncio.TimerHandle | None = None

    def add(self, protocol: GuardedHttpToolsProtocol) -> None:
        self.since.pop(protocol, None)  # kept in order of arrival: the sweep relies on it
        self.since[protocol] = self.loop.time()
        while len(self.since) > protocol.max_heads_waiting:
            oldest, _ = self.since.popitem(last=False)
            oldest.close_waiting("too many connections waiting for a request head: oldest closed")
        if self.sweeper is None:
            self.sweeper = self.loop.call_later(HEAD_CHECK_INTERVAL, self.sweep)

    def sweep(self) -> None:
        self.sweeper = None
        now = self.loop.time()
        while self.since:
            protocol, since = next(iter(self.since.items()))
            if now - since < protocol.header_timeout:
                break
            del self.since[protocol]
            protocol.close_waiting("no complete request head within the deadline: closed")
        if self.since:
            self.sweeper = self.loop.call_later(HEAD_CHECK_INTERVAL, self.sweep)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head deadline, a head size cap and eviction."""

    header_timeout: float = HEADER_TIMEOUT
    max_header_bytes: int = MAX_HEADER_BYTES
    max_heads_waiting: int = MAX_HEADS_WAITING

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._heading = False  # waiting for a request head
        self._head_bytes = 0  # raw bytes received while waiting for this head
        self._draining = False  # a refused head: input is dropped until the connection closes
        waiting = getattr(self.server_state, "renderqueue_heads_waiting", None)
        if waiting is None:
            waiting = _HeadsWaiting(self.loop)
            # one count per server, kept on uvicorn's ServerState (shared by its connections)
            self.server_state.renderqueue_heads_waiting = waiting  # pyright: ignore[reportAttributeAccessIssue]
        self._waiting: _HeadsWaiting = waiting
        super().connection_made(transport)
        self._await_head()

    def _await_head(self) -> None:
        """Start waiting for a request head: the deadline starts, the oldest may be closed."""
        self._head_bytes = 0
        self._heading = True
        self._waiting.add(self)

    def _head_done(self) -> None:
        if self._heading:
            self._heading = False
            self._waiting.since.pop(self, None)

    def close_waiting(self, why: str) -> None:
        """Closed while waiting for a head (deadline passed, or the oldest of too many)."""
        self._heading = False
        log.debug("%s (client %s)", why, self.client)
        if not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._draining:
            return  # the rest of a refused head: read and dropped until we close
        heading = self._heading
        if heading:
            self._head_bytes += len(data)
        super().data_received(data)
        if heading and self._heading and self._head_bytes > self.max_header_bytes:
            self._head_done()  # still no complete head, and already over the cap
            if not self.transport.is_closing():
                self._refuse_head()

    def _refuse_head(self) -> None:
        """431, then our side closed; what the client still sends is drained for a moment,
        so that closing does not reset the connection before it reads the answer."""
        self._draining = True
        self.transport.write(_TOO_LARGE)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(DRAIN_SECONDS, self.transport.close)

    def on_headers_complete(self) -> None:
        self._head_done()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size <= self.max_header_bytes:
            super().on_headers_complete()
            return
        app, self.app = self.app, _headers_too_large
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_response_complete(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            # answered before its body was read: the rest of it must not hold the connection
            # (the receiver's own early answers say `connection: close`)
            self.transport.close()
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._await_head()


def server_options(*, limit_concurrency: int = DEFAULT_LIMIT_CONCURRENCY) -> dict[str, Any]:
    """uvicorn.Config options for the receiver (the CLI, tests and benchmarks use these)."""
    return {
        "http": GuardedHttpToolsProtocol,
        "limit_concurrency": limit_concurrency,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
    }
