"""Serving an ASGI app with uvicorn: in the foreground or from a background thread.

The one place that starts a uvicorn server in-process: the fal simulator, its Platform
API, the receiver the headless demo runs, and the tests and benchmarks all use
`ServerThread` (or `serve_in_thread`). The socket is bound before the server starts, so
port 0 works and the real port is known up front.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn


def client_host(host: str) -> str:
    """The host a client should dial (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - compared, not bound


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (not yet listen) so the real port is known before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: without it every response waited ~40 ms for a
    # delayed ACK (Nagle), far more than fal's own latency knobs
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for choosing one before anything starts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn serving one app on one bound socket; `run()` in the foreground or
    `start()`/`stop()` (or `with`) in a daemon thread.

    `options` go to `uvicorn.Config` (TLS files, lifespan, log level, the receiver's
    `webhook.limits.server_options()`); the defaults suit tests: warnings only, no access
    log, a 2 s graceful shutdown.
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        sock: socket.socket | None = None,
        name: str = "asgi",
        **options: Any,
    ) -> None:
        self.app = app
        self.host = host
        self.name = name
        self.sock = sock if sock is not None else bind_socket(host, port)
        self.port: int = self.sock.getsockname()[1]
        config = {"log_level": "warning", "lifespan": "on", "timeout_graceful_shutdown": 2}
        config.setdefault("access_log", options.get("log_level") in ("debug", "trace"))
        self.tls = bool(options.get("ssl_certfile"))
        self.server = uvicorn.Server(uvicorn.Config(app, **{**config, **options}))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL a client on this machine dials (https when serving TLS)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{client_host(self.host)}:{self.port}"

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def run(self) -> None:
        """Serve in the foreground until SIGINT/SIGTERM (or `stop()` from another thread)."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def _run_in_thread(self) -> None:
        # uvicorn ends a failed startup with sys.exit(): in a thread that is only noise,
        # and start() raises naming the server instead
        with contextlib.suppress(SystemExit):
            self.run()

    def start(self, timeout: float = 15.0) -> ServerThread:
        """Serve in a daemon thread; return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError(
                f"{self.name} on port {self.port} was already started; make a new one"
            )
        self._thread = threading.Thread(
            target=self._run_in_thread, name=f"{self.name}:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"{self.name} on {self.host}:{self.port} failed to start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} on {self.host}:{self.port} did not start in time")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to exit (it finishes in-flight requests), join the thread, and
        force the exit if the graceful one overran."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.server.force_exit = True
                self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serve_in_thread(
    app: Any, host: str = "127.0.0.1", port: int = 0, **options: Any
) -> Iterator[str]:
    """Run `app` under uvicorn in a daemon thread; yield its base URL; stop on exit."""
    with ServerThread(app, host=host, port=port, **options) as server:
        yield server.url
