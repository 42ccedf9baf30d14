"""fal's side of a webhook, for tests and benchmarks: a JWKS server, a signer, a body.

Written from fal-wire.md independently of the receiver's verifier, so tests that sign
with these and verify with `signature.py` check one implementation against another.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    """The public half of `key` as an OKP/Ed25519 JWK."""
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return {"kty": "OKP", "crv": "Ed25519", "x": x}


class JwksServer:
    """Serves a JWKS over HTTP from a mutable key list; `down = True` makes it answer 500.

    `extra` JWK dicts are served after the keys as they are (malformed ones, other types).
    """

    def __init__(self, *keys: Ed25519PrivateKey) -> None:
        self.keys = list(keys)
        self.extra: list[Any] = []
        self.down = False
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                if outer.down:
                    self.send_response(500)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"keys": [*outer.extra, *(jwk(k) for k in outer.keys)]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/.well-known/jwks.json"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def fal_body(request_id: str, status: str = "OK", payload: Any = None, **extra: Any) -> bytes:
    """A webhook body as fal sends it (json.dumps, sorted keys); OK carries a 5 s video."""
    if payload is None and status == "OK":
        payload = {
            "video": {
                "url": f"https://v3b.fal.media/files/b/{request_id}/output.mp4",
                "content_type": "video/mp4",
                "file_name": "output.mp4",
                "file_size": 1000,
                "duration": 5,
            },
            "seed": 1,
        }
    body = {
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": status,
        "payload": payload,
        "error": None if status == "OK" else "Invalid status code: 422",
    }
    return json.dumps({**body, **extra}, sort_keys=True).encode()


def signed_headers(
    key: Ed25519PrivateKey,
    body: bytes,
    request_id: str,
    *,
    user_id: str = "user-1",
    timestamp: int | str | None = None,
) -> dict[str, str]:
    """fal's four signature headers over `body` (plus content-type), signed with `key`.

    A str `timestamp` is signed and sent exactly as given.
    """
    ts = str(int(time.time()) if timestamp is None else timestamp)
    message = f"{request_id}\n{user_id}\n{ts}\n{hashlib.sha256(body).hexdigest()}".encode()
    return {
        "content-type": "application/json",
        "x-fal-webhook-request-id": request_id,
        "x-fal-webhook-user-id": user_id,
        "x-fal-webhook-timestamp": ts,
        "x-fal-webhook-signature": key.sign(message).hex(),
    }


class SlowSenders:
    """Connections that never finish a request, for lock-out tests and the benchmark.

    `count` sockets to a loopback receiver, each sending either a well-formed, signed-shape
    POST head and then its body a byte per `interval` (`mode="body"`: no secret needed,
    the signature is only checked once the body is in), or a request head a header line
    per `interval` (`mode="head"`). A connection the server answers or closes is
    reopened at once, so the crowd stays `count` strong for as long as it runs.
    """

    def __init__(
        self, host: str, port: int, count: int, *, mode: str = "body", interval: float = 1.0
    ) -> None:
        if mode not in ("body", "head"):
            raise ValueError(f"mode: {mode!r} is neither 'body' nor 'head'")
        self.address = (host, port)
        self.count = count
        self.mode = mode
        self.interval = interval
        self.opened = 0
        self.cut = 0  # connections the server answered or closed
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"slow-{mode}", daemon=True)

    def _head(self) -> bytes:
        lines = ["POST /webhooks/fal HTTP/1.1", f"Host: {self.address[0]}"]
        if self.mode == "body":
            request_id = f"slow-{self.opened}"
            lines += [
                "Content-Length: 100000",
                "Content-Type: application/json",
                f"X-Fal-Webhook-Request-Id: {request_id}",
                "X-Fal-Webhook-User-Id: user-1",
                f"X-Fal-Webhook-Timestamp: {int(time.time())}",
                f"X-Fal-Webhook-Signature: {'ab' * 64}",
            ]
            return ("\r\n".join(lines) + "\r\n\r\n{").encode()
        return ("\r\n".join(lines) + "\r\n").encode()

    def _open(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(self.address, timeout=5)
            sock.sendall(self._head())
        except OSError:
            return None
        sock.setblocking(False)
        self.opened += 1
        return sock

    def _alive(self, sock: socket.socket) -> bool:
        """Still held: nothing answered, not closed; else closed here and counted."""
        try:
            if sock.recv(65536, socket.MSG_DONTWAIT) == b"":
                raise ConnectionResetError
        except BlockingIOError:
            try:
                sock.send(b" " if self.mode == "body" else b"X-Slow: 1\r\n")
                return True
            except OSError:
                pass
        except OSError:
            pass
        self.cut += 1
        sock.close()
        return False

    def _run(self) -> None:
        while len(self._sockets) < self.count and not self._stop.is_set():
            sock = self._open()
            if sock is not None:
                self._sockets.append(sock)
        while not self._stop.wait(self.interval):
            held = [s for s in self._sockets if self._alive(s)]
            while len(held) < self.count and not self._stop.is_set():
                sock = self._open()
                if sock is None:
                    break
                held.append(sock)
            self._sockets = held

    @property
    def held(self) -> int:
        return len(self._sockets)

    def start(self, timeout: float = 60) -> SlowSenders:
        """Open all `count` connections (returns once they are open) and keep them busy."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while len(self._sockets) < self.count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def __enter__(self) -> SlowSenders:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
