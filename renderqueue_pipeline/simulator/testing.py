"""A reusable harness for tests that need fal: a running simulator and a webhook sink.

    with running_simulator(tmp_path, seed=7, **FAST_TEST_OPTIONS) as sim:
        sim.env                       # FAL_QUEUE_RUN_HOST, SSL_CERT_FILE, FAL_KEY, ...
        sim.control.set_faults(webhook_duplicate_rate=1.0)
        ...                           # drive fal_client / the gateway
        sim.control.ground_truth()    # what the simulator decided, per request
        sim.control.webhook_attempts()

fal-client reads FAL_QUEUE_RUN_HOST once, at import: a test process must export
`sim.env` (or the pytest plugin's early env) before `import fal_client`, and must
keep the simulator on that port (`restart()` reuses it).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from renderqueue_pipeline.simulator.config import FAST_TEST_OPTIONS, SimConfig
from renderqueue_pipeline.simulator.server import SimulatorServer, client_env, simulator_dir

__all__ = [
    "FAST_TEST_OPTIONS",
    "ReceivedWebhook",
    "RunningSimulator",
    "SimControl",
    "WebhookSink",
    "running_simulator",
    "wait_until",
    "webhook_sink",
]


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.01) -> Any:
    """Poll until `predicate()` is truthy and return its value; raise TimeoutError otherwise.

    The default deadline is generous on purpose: it only matters when something is wrong,
    and a loaded 2-core machine can take seconds to run a millisecond-scale request.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


class SimControl:
    """A client of the simulator's control API (`/_sim/...`); no fal equivalent."""

    def __init__(self, base_url: str, ca_bundle: Path) -> None:
        self._http = httpx.Client(
            base_url=f"{base_url}/_sim",
            verify=ssl.create_default_context(cafile=ca_bundle),
            timeout=10,
        )

    def close(self) -> None:
        self._http.close()

    def _json(self, response: httpx.Response) -> Any:
        response.raise_for_status()
        return response.json()

    def health(self) -> dict[str, Any]:
        return self._json(self._http.get("/health"))

    def config(self) -> dict[str, Any]:
        return self._json(self._http.get("/config"))

    def set_faults(self, **options: Any) -> dict[str, Any]:
        """Change knobs now (applies to requests submitted from now on)."""
        return self._json(self._http.patch("/config", json=options))

    def reset(self, **options: Any) -> dict[str, Any]:
        """Forget all requests and deliveries; restart counters; apply `options` on top."""
        return self._json(self._http.post("/reset", json=options))

    def ground_truth(self, request_id: str | None = None) -> Any:
        """Per request: status, output, billed_seconds, decisions, timestamps."""
        path = f"/ground-truth/{request_id}" if request_id else "/ground-truth"
        return self._json(self._http.get(path))

    def webhook_attempts(self, request_id: str | None = None) -> list[dict[str, Any]]:
        """Every delivery attempt (delivered, failed or dropped), in the order they happened."""
        params = {"request_id": request_id} if request_id else None
        return self._json(self._http.get("/webhooks", params=params))

    def rotate_keys(self) -> dict[str, Any]:
        """A new webhook signing key; the previous one stays in the JWKS. Returns the JWKS."""
        return self._json(self._http.post("/jwks/rotate"))

    def add_file(
        self,
        size: int,
        *,
        name: str = "output.mp4",
        content_type: str = "video/mp4",
        lifetime: float | None = None,
    ) -> dict[str, Any]:
        """A CDN file of `size` bytes with no request behind it: {url, file_id, file_size, ...}.

        The bytes are made on the fly per block, so sizes up to many GB cost nothing upfront.
        """
        spec = {"size": size, "name": name, "content_type": content_type, "lifetime": lifetime}
        return self._json(self._http.post("/files", json=spec))

    def wait_finished(self, request_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Block until the request is terminal in the simulator; return its ground truth."""
        return wait_until(
            lambda: (
                truth
                if (truth := self.ground_truth(request_id))["status"]
                in ("completed", "failed", "canceled")
                else None
            ),
            timeout,
        )


@dataclass
class RunningSimulator:
    """A simulator serving in a background thread of this process."""

    home: Path
    host: str
    port: int
    config: SimConfig
    server: SimulatorServer | None = None
    control: SimControl = field(init=False)
    sock: socket.socket | None = None  # a socket bound in advance, used by the first start

    def __post_init__(self) -> None:
        self.start()

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def cert_path(self) -> Path:
        """The simulator's own certificate (self-signed; SAN 127.0.0.1 and localhost)."""
        return simulator_dir(self.home) / "cert.pem"

    @property
    def ca_bundle(self) -> Path:
        """Public roots + our certificate: what SSL_CERT_FILE points at."""
        return simulator_dir(self.home) / "ca-bundle.pem"

    @property
    def env(self) -> dict[str, str]:
        """FAL_QUEUE_RUN_HOST, FAL_RUN_HOST, SSL_CERT_FILE, FAL_KEY, FAL_ADMIN_KEY, FAL_JWKS_URL."""
        return client_env(
            self.home, self.host, self.port, self.config.fal_key, self.config.admin_key
        )

    @property
    def fal_key(self) -> str:
        """The plain key the queue accepts (the home's generated one unless configured)."""
        return self.env["FAL_KEY"]

    @property
    def admin_key(self) -> str:
        """The admin key delete_io and the Platform API accept."""
        return self.env["FAL_ADMIN_KEY"]

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/.well-known/jwks.json"

    @property
    def running(self) -> bool:
        return self.server is not None

    def start(self) -> None:
        if self.server is not None:
            return
        sock, self.sock = self.sock, None
        self.server = SimulatorServer(
            self.home,
            host=self.host,
            port=self.port,
            config=self.config,
            graceful_shutdown=0.2,
            sock=sock,
        )
        self.port = self.server.port
        self.server.start()
        self.control = SimControl(self.base_url, self.server.bundle)

    def stop(self) -> None:
        """Stop serving; pending webhook deliveries are abandoned (like a crashed fal)."""
        if self.server is None:
            return
        self.control.close()
        self.server.stop()
        self.server = None

    def restart(self, **options: Any) -> None:
        """Stop and start again on the same port (fresh state; same keys and certificate)."""
        self.stop()
        if options:
            self.config = SimConfig.model_validate({**self.config.model_dump(), **options})
        self.start()


@contextlib.contextmanager
def running_simulator(
    home: Path,
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    seed: int = 0,
    sock: socket.socket | None = None,
    **options: Any,
) -> Iterator[RunningSimulator]:
    """Start a simulator (thread) for the duration of the block; always stopped afterwards.

    `options` are `SimConfig` knobs (see `FAST_TEST_OPTIONS` for millisecond timings).
    `sock`: a socket already bound (e.g. to port 0 long before), served by the first start.
    """
    config = SimConfig(seed=seed, **options)
    if sock is not None:
        port = sock.getsockname()[1]
    sim = RunningSimulator(Path(home), host, port or 0, config, sock=sock)
    try:
        yield sim
    finally:
        sim.stop()


# ----- a webhook sink: records every POST exactly as received ------------------------------------


@dataclass(frozen=True)
class ReceivedWebhook:
    """One POST as it arrived: raw body bytes (verify these, never re-serialised JSON)."""

    path: str
    headers: dict[str, str]
    body: bytes
    arrived_mono: float
    arrived_wall: float
    answered: int

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-fal-webhook-request-id")


class WebhookSink:
    """A plain-HTTP server on 127.0.0.1 recording webhooks; answers are scriptable."""

    def __init__(self) -> None:
        self.received: list[ReceivedWebhook] = []
        self.lock = threading.Lock()
        self._script: list[int] = []
        self.default_status = 200
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with sink.lock:
                    status = sink._script.pop(0) if sink._script else sink.default_status
                    sink.received.append(
                        ReceivedWebhook(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            body,
                            time.monotonic(),
                            time.time(),
                            status,
                        )
                    )
                payload = b'{"ok":true}' if status < 300 else b'{"ok":false}'
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/fal/webhook"

    def answer_next(self, *statuses: int) -> None:
        """Answer the next POSTs with these statuses (then `default_status`)."""
        with self.lock:
            self._script.extend(statuses)

    def accepted(self) -> list[ReceivedWebhook]:
        with self.lock:
            return [w for w in self.received if 200 <= w.answered < 300]

    def for_request(self, request_id: str) -> list[ReceivedWebhook]:
        with self.lock:
            return [w for w in self.received if w.request_id == request_id]

    def start(self) -> WebhookSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@contextlib.contextmanager
def webhook_sink() -> Iterator[WebhookSink]:
    """A running `WebhookSink` for the duration of the block."""
    sink = WebhookSink().start()
    try:
        yield sink
    finally:
        sink.stop()
