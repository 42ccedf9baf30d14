"""Test parts for the webhook receiver: a JWKS server with our own key, a signer, a server."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from renderqueue_pipeline.webhook.background import serve_in_thread


def jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
    }


class JwksServer:
    """Serves a JWKS over HTTP from a mutable key list; can be made to fail."""

    def __init__(self, *keys: Ed25519PrivateKey) -> None:
        self.keys = list(keys)
        self.down = False
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.hits += 1
                if outer.down:
                    self.send_response(500)
                    self.end_headers()
                    return
                body = json.dumps({"keys": [jwk(k) for k in outer.keys]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/.well-known/jwks.json"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def fal_body(request_id: str, status: str = "OK", payload: Any = None, **extra: Any) -> bytes:
    """A webhook body as fal sends it: json.dumps with sorted keys."""
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
    timestamp: int | None = None,
) -> dict[str, str]:
    """fal's four signature headers over `body`, signed with `key`."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    message = f"{request_id}\n{user_id}\n{ts}\n{hashlib.sha256(body).hexdigest()}".encode()
    return {
        "content-type": "application/json",
        "x-fal-webhook-request-id": request_id,
        "x-fal-webhook-user-id": user_id,
        "x-fal-webhook-timestamp": ts,
        "x-fal-webhook-signature": key.sign(message).hex(),
    }


def serving(app: Any) -> contextlib.AbstractContextManager[str]:
    """Serve an ASGI app with uvicorn in a thread; yields its base URL."""
    return serve_in_thread(app)
