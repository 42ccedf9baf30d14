"""A small local alert receiver for the demo: records the JSON bodies posted to it.

`make demo` / `renderqueue demo` point RENDERQUEUE_ALERT_WEBHOOK_URL at it (127.0.0.1, a
free port) when no alert URL is configured, and print what it received.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class LocalReceiver:
    url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def local_alert_receiver() -> Iterator[LocalReceiver]:
    """Serve on 127.0.0.1 (port 0) in a daemon thread; answer every JSON POST with 200."""
    bodies: list[dict[str, Any]] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            except (ValueError, json.JSONDecodeError):
                self.send_response(400)
                self.end_headers()
                return
            with lock:
                bodies.append(body)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass  # the demo prints what it received instead

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="alert-receiver", daemon=True)
    thread.start()
    try:
        yield LocalReceiver(f"http://127.0.0.1:{server.server_address[1]}/alerts", bodies)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
