"""The Platform API on its own TLS port (the simulator's certificate), in a thread."""

from __future__ import annotations

from pathlib import Path

from renderqueue_pipeline.serving import ServerThread, client_host
from renderqueue_pipeline.simulator.keys import ApiKeys
from renderqueue_pipeline.simulator.platform.api import build_platform_app
from renderqueue_pipeline.simulator.platform.book import BillingBook
from renderqueue_pipeline.simulator.server import ensure_ca_bundle


def platform_env(host: str, port: int) -> dict[str, str]:
    """What a client needs besides the simulator's own env (same certificate bundle)."""
    return {"RENDERQUEUE_FAL_API_URL": f"https://{client_host(host)}:{port}/v1"}


class PlatformServer:
    """The Platform API on its own TLS port (the simulator's certificate), in a thread."""

    def __init__(
        self,
        home: Path,
        book: BillingBook,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
    ) -> None:
        self.home = Path(home).expanduser().resolve()
        self.book = book
        self.host = host
        self.cert, self.key, self.bundle = ensure_ca_bundle(self.home)
        self.keys = ApiKeys.load_or_create(self.home / "simulator")
        self.app = build_platform_app(book, self.keys)
        self._server = ServerThread(
            self.app,
            host=host,
            port=port,
            name="fal-platform",
            ssl_certfile=str(self.cert),
            ssl_keyfile=str(self.key),
            log_level=log_level,
            access_log=False,
            loop="asyncio",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self.sock = self._server.sock
        self.port: int = self._server.port

    @property
    def api_url(self) -> str:
        return platform_env(self.host, self.port)["RENDERQUEUE_FAL_API_URL"]

    @property
    def base_url(self) -> str:
        return self.api_url.removesuffix("/v1")

    def start(self, timeout: float = 15.0) -> PlatformServer:
        """Serve in a daemon thread; return once the server accepts connections."""
        self._server.start(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.stop(timeout)

    def __enter__(self) -> PlatformServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
