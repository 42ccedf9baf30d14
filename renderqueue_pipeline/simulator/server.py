"""Running the simulator: TLS material, the client environment, and a uvicorn server.

`SimulatorServer` runs in the foreground (the CLI) or in a background thread
(tests), on a socket bound before start so the port is known up front.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import certifi
import uvicorn

from renderqueue_pipeline.simulator.app import build_app
from renderqueue_pipeline.simulator.config import SimConfig
from renderqueue_pipeline.simulator.keys import ApiKeys, ensure_tls_cert

DEFAULT_PORT = 8765


def simulator_dir(home: Path) -> Path:
    return Path(home).expanduser().resolve() / "simulator"


def ensure_ca_bundle(home: Path) -> tuple[Path, Path, Path]:
    """(cert, key, bundle): bundle = certifi's public roots + our certificate.

    SSL_CERT_FILE points at the bundle, not at our lone certificate, so the same
    shell or process can still reach real HTTPS hosts (PyPI, S3, fal's JWKS).
    """
    directory = simulator_dir(home)
    cert, key = ensure_tls_cert(directory)
    bundle = directory / "ca-bundle.pem"
    wanted = Path(certifi.where()).read_bytes().rstrip(b"\n") + b"\n" + cert.read_bytes()
    if not bundle.exists() or bundle.read_bytes() != wanted:
        tmp = bundle.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(wanted)
        os.replace(tmp, bundle)
    return cert, key, bundle


def client_host(host: str) -> str:
    """The host a client should dial (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - reads, not binds


def api_keys(home: Path) -> ApiKeys:
    """The simulated account's plain and admin keys (made at first use, kept under home)."""
    return ApiKeys.load_or_create(simulator_dir(home))


def client_env(
    home: Path,
    host: str,
    port: int,
    fal_key: str | None = None,
    admin_key: str | None = None,
) -> dict[str, str]:
    """The environment fal-client (and our webhook receiver) needs to talk to the simulator.

    FAL_KEY / FAL_ADMIN_KEY: the home's generated keys unless a simulator was started with
    explicit ones (`fal_key`, `admin_key`).
    """
    _, _, bundle = ensure_ca_bundle(home)
    keys = api_keys(home)
    hostport = f"{client_host(host)}:{port}"
    return {
        "FAL_QUEUE_RUN_HOST": hostport,
        "FAL_RUN_HOST": f"{hostport}/_run",
        "SSL_CERT_FILE": str(bundle),
        "FAL_KEY": fal_key or keys.fal_key,
        "FAL_ADMIN_KEY": admin_key or keys.admin_key,
        "FAL_JWKS_URL": f"https://{hostport}/.well-known/jwks.json",
        # fal's REST API (delete_io) lives on the same server here
        "RENDERQUEUE_FAL_REST_URL": f"https://{hostport}",
    }


def export_lines(env: dict[str, str]) -> str:
    """`export K='v'` lines for `eval "$(...)"`."""
    return "".join(f"export {k}='{v}'\n" for k, v in env.items())


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


class SimulatorServer:
    """One simulator instance on one bound socket; start in a thread or run in the foreground."""

    def __init__(
        self,
        home: Path,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        config: SimConfig | None = None,
        log_level: str = "warning",
        graceful_shutdown: float = 2.0,
        sock: socket.socket | None = None,
    ) -> None:
        self.home = Path(home).expanduser().resolve()
        self.host = host
        self.config = config or SimConfig()
        self.cert, self.key, self.bundle = ensure_ca_bundle(self.home)
        self.sock = sock if sock is not None else bind_socket(host, port)
        self.port: int = self.sock.getsockname()[1]
        self.app = build_app(self.home, self.config)
        self._uvicorn = uvicorn.Server(
            uvicorn.Config(
                self.app,
                ssl_certfile=str(self.cert),
                ssl_keyfile=str(self.key),
                log_level=log_level,
                access_log=log_level in ("debug", "trace"),
                loop="asyncio",
                lifespan="on",
                timeout_graceful_shutdown=graceful_shutdown,
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"https://{client_host(self.host)}:{self.port}"

    def env(self) -> dict[str, str]:
        return client_env(
            self.home, self.host, self.port, self.config.fal_key, self.config.admin_key
        )

    def run(self) -> None:
        """Serve in the foreground until SIGINT/SIGTERM."""
        try:
            self._uvicorn.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def start(self, timeout: float = 15.0) -> SimulatorServer:
        """Serve in a daemon thread; return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("this SimulatorServer was already started; make a new one")
        self._thread = threading.Thread(
            target=self.run, name=f"fal-simulator:{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"fal simulator on port {self.port} failed to start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fal simulator on port {self.port} did not start in time")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, cancel pending webhook tasks and join the thread."""
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._uvicorn.force_exit = True
                self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
