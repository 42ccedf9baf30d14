"""fal's side of a webhook, for tests and benchmarks: a JWKS server, a signer, a body.

Written from fal-wire.md independently of the receiver's verifier, so tests that sign
with these and verify with `signature.py` check one implementation against another.
"""

from __future__ import annotations

import base64
import hashlib
import json
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
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
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
