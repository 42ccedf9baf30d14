"""Running the simulator: TLS material, the client environment, and a uvicorn server.

`SimulatorServer` runs in the foreground (the CLI) or in a background thread
(tests), on a socket bound before start so the port is known up front
(`renderqueue_pipeline.serving.ServerThread` does the serving).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import certifi

from renderqueue_pipeline.serving import ServerThread, client_host
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
        self.app = build_app(self.home, self.config)
        self._server = ServerThread(
            self.app,
            host=host,
            port=port,
            sock=sock,
            name="fal-simulator",
            ssl_certfile=str(self.cert),
            ssl_keyfile=str(self.key),
            log_level=log_level,
            loop="asyncio",
            lifespan="on",
            timeout_graceful_shutdown=graceful_shutdown,
        )
        self.sock = self._server.sock
        self.port: int = self._server.port

    @property
    def base_url(self) -> str:
        return self._server.url

    def env(self) -> dict[str, str]:
        return client_env(
            self.home, self.host, self.port, self.config.fal_key, self.config.admin_key
        )

    def run(self) -> None:
        """Serve in the foreground until SIGINT/SIGTERM."""
        self._server.run()

    def start(self, timeout: float = 15.0) -> SimulatorServer:
        """Serve in a daemon thread; return once the server accepts connections."""
        self._server.start(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, cancel pending webhook tasks and join the thread."""
        self._server.stop(timeout)

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
