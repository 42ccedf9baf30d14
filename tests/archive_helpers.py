"""Loopback HTTP servers for archive tests: a scriptable media server and a canary.

`MediaServer` serves deterministic bytes per path, scripted per request: a status, a
redirect, a wrong Content-Length, a disconnect after N bytes. `MediaServer` bound to
127.0.0.2 is the canary: it records every connection it accepts, before reading a byte,
so a test can assert that a refused fetch never reached it.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
from ledger_helpers import submit_row

from renderqueue_pipeline.archive.fetch import literal_address
from renderqueue_pipeline.ledger import LedgerEvent, record_event

CHUNK = 64 * 1024


def media_bytes(seed: str, size: int) -> Iterator[bytes]:
    """Deterministic bytes of `size` (a function of the seed), in chunks."""
    rng = random.Random(seed)
    remaining = size
    while remaining > 0:
        block = rng.randbytes(min(CHUNK, remaining))
        remaining -= len(block)
        yield block


def media_sha256(seed: str, size: int) -> str:
    digest = hashlib.sha256()
    for block in media_bytes(seed, size):
        digest.update(block)
    return digest.hexdigest()


@dataclass
class Behaviour:
    """What the server does for one request to a path."""

    size: int = 0
    status: int = 200
    content_length: int | str | None = "auto"  # "auto": the true size; None: chunked
    disconnect_after: int | None = None  # close the socket after this many body bytes
    location: str | None = None  # redirect target (status 30x)
    content_type: str = "video/mp4"
    drip_every: float = 0.0  # seconds between body pieces of `drip_bytes` (a slow server)
    drip_bytes: int = 1
    stall_after: int | None = None  # after this many body bytes, send nothing for `stall_for`
    stall_for: float = 0.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: MediaServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        pass  # clients that hang up (refused, too large) are part of the tests

    def get_request(self):  # every accepted connection, before a byte is read
        conn, addr = super().get_request()
        with self.owner.lock:
            self.owner.connections += 1
        return conn, addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def _serve(self, head_only: bool) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        with owner.lock:
            owner.requests.append(path)
            script = owner.scripts.get(path)
            behaviour = (script.pop(0) if len(script) > 1 else script[0]) if script else None
        if behaviour is None:
            behaviour = Behaviour(status=404)
        if behaviour.location is not None:
            self.send_response(behaviour.status)
            self.send_header("Location", behaviour.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if behaviour.status != 200:
            body = f"status {behaviour.status}".encode()
            self.send_response(behaviour.status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", behaviour.content_type)
        length = behaviour.size if behaviour.content_length == "auto" else behaviour.content_length
        chunked = length is None
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        if head_only:
            return
        if behaviour.drip_every or behaviour.stall_after is not None:
            self._trickle(path, behaviour, chunked)
            return
        sent = 0
        for block in media_bytes(path, behaviour.size):
            if behaviour.disconnect_after is not None and sent + len(block) > (
                behaviour.disconnect_after
            ):
                block = block[: behaviour.disconnect_after - sent]
                self._write(block, chunked)
                self.wfile.flush()
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self._write(block, chunked)
            sent += len(block)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        if length is not None and length != behaviour.size:
            self.close_connection = True

    def _trickle(self, path: str, behaviour: Behaviour, chunked: bool) -> None:
        """The body slowly: `drip_bytes` every `drip_every` s, or a stall after some bytes."""
        body = b"".join(media_bytes(path, behaviour.size))
        step = behaviour.drip_bytes if behaviour.drip_every else len(body)
        stall_at = behaviour.stall_after
        sent = 0
        while sent < len(body):
            if stall_at is not None and sent >= stall_at:
                time.sleep(behaviour.stall_for)
                stall_at = None
            end = min(sent + step, len(body), len(body) if stall_at is None else stall_at)
            self._write(body[sent:end], chunked)
            self.wfile.flush()
            sent = end
            if behaviour.drip_every:
                time.sleep(behaviour.drip_every)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _write(self, block: bytes, chunked: bool) -> None:
        if not block:
            return
        if chunked:
            self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
        else:
            self.wfile.write(block)

    def do_GET(self) -> None:
        self._serve(head_only=False)

    def do_HEAD(self) -> None:
        self._serve(head_only=True)


class MediaServer:
    """A loopback HTTP server with scripted behaviours per path."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.lock = threading.Lock()
        self.scripts: dict[str, list[Behaviour]] = {}
        self.requests: list[str] = []
        self.connections = 0
        self._server = _Server((host, 0), self)
        self.host = host
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    def serve(self, path: str, *behaviours: Behaviour) -> str:
        """Script a path (behaviours are used in turn; the last one repeats); its URL."""
        with self.lock:
            self.scripts[path] = list(behaviours)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://{self.netloc}{path}"

    def hits(self, path: str) -> int:
        with self.lock:
            return self.requests.count(path)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def media_server(host: str = "127.0.0.1") -> Iterator[MediaServer]:
    server = MediaServer(host)
    try:
        yield server
    finally:
        server.close()


def completed_row(
    conn: psycopg.Connection,
    payload: dict[str, Any],
    *,
    request_id: str | None = None,
    fal_expires_at: str | None = None,
    expires_in: str | None = None,
) -> str:
    """A generation completed through the ledger's own writer with this output payload."""

    request_id, _ = submit_row(conn, request_id or f"req-{uuid.uuid4().hex[:16]}")
    record_event(conn, LedgerEvent(request_id=request_id, kind="completed", payload=payload))
    conn.commit()
    if fal_expires_at is not None:
        conn.execute(
            "update generations set fal_expires_at = %s::timestamptz where request_id = %s",
            (fal_expires_at, request_id),
        )
        conn.commit()
    if expires_in is not None:
        conn.execute(
            "update generations set fal_expires_at = now() + %s::interval where request_id = %s",
            (expires_in, request_id),
        )
        conn.commit()
    return request_id


def video(url: str, size: int | None, file_name: str = "output.mp4") -> dict[str, Any]:
    """fal's text-to-video output shape (documented fields only)."""
    file: dict[str, Any] = {"url": url, "content_type": "video/mp4", "file_name": file_name}
    if size is not None:
        file["file_size"] = size
    return {"video": file, "seed": 7}


def images(*files: tuple[str, int]) -> dict[str, Any]:
    """fal's image output shape: several files."""
    return {
        "images": [
            {
                "url": url,
                "content_type": "image/jpeg",
                "file_name": "image.jpeg",
                "file_size": size,
                "width": 64,
                "height": 64,
            }
            for url, size in files
        ],
        "seed": 7,
    }


def row(conn: psycopg.Connection, request_id: str) -> dict[str, Any]:
    return conn.execute("select * from generations where request_id = %s", (request_id,)).fetchone()


def table_resolver(table: dict[str, list[str]], calls: list[str]) -> Any:
    """A FetchPolicy resolver that answers from `table` (no DNS), recording each host asked;
    an IP literal resolves to itself."""

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        literal = literal_address(host)
        if literal is not None:
            return [str(literal)]
        return table[host]

    return resolve
