"""A real HTTP receiver on 127.0.0.1 (port 0) that records the alert bodies it is sent."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN_PATH = "/services/T0001/B0002/s3cr3tT0k3n"  # Slack-style: the token is in the path


@dataclass
class Receiver:
    """What the receiver saw; `statuses` are answered in order, then 200."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)  # every body, any answer
    accepted: list[dict[str, Any]] = field(default_factory=list)  # bodies answered 2xx
    lock: threading.Lock = field(default_factory=threading.Lock)

    def texts(self) -> list[str]:
        return [body["text"] for body in self.accepted]


@contextmanager
def alert_receiver(statuses: list[int] | None = None, delay_s: float = 0.0) -> Iterator[Receiver]:
    """Serve on 127.0.0.1, a free port; the URL carries a token in its path like Slack's."""
    receiver = Receiver(statuses=list(statuses or []), delay_s=delay_s)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if receiver.delay_s:
                time.sleep(receiver.delay_s)
            with receiver.lock:
                receiver.requests.append(body)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if 200 <= status < 300:
                    receiver.accepted.append(body)
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}{TOKEN_PATH}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
