"""pytest plugin: makes the real fal_client talk to a local fal simulator in this process.

Register with `pytest_plugins = ["fal_sim_plugin"]` (tests/ on sys.path) or run
`pytest -p fal_sim_plugin` with PYTHONPATH=tests.

fal-client reads FAL_QUEUE_RUN_HOST when it is first imported, so
this module binds a socket to port 0 and exports the simulator's client
environment for the port it got when it is imported (before test modules are
collected); `pytest_configure` checks that fal_client did not freeze another
host earlier. The simulator itself starts lazily, serving that very socket (so
no other process can take the port in between), the first time a test asks.

Fixtures:
- `fal_simulator` (session): the `RunningSimulator` (thread), fast test timings.
- `fal_sim` (function): the same simulator, reset to fast defaults (clean state,
  seed 0) before the test; use `fal_sim.control.set_faults(...)` to script faults.
- `webhook_sink` (function): a recording HTTP webhook receiver (`.url`, `.received`).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from renderqueue_pipeline.serving import bind_socket
from renderqueue_pipeline.settings import get_settings
from renderqueue_pipeline.simulator.config import SimConfig
from renderqueue_pipeline.simulator.server import client_env
from renderqueue_pipeline.simulator.testing import (
    FAST_TEST_OPTIONS,
    RunningSimulator,
    WebhookSink,
    running_simulator,
)
from renderqueue_pipeline.simulator.testing import webhook_sink as running_webhook_sink


def _session_env(home: Path, port: int) -> dict[str, str]:
    """The simulator's printed env (its generated FAL_KEY), without FAL_ADMIN_KEY.

    The session has no Platform API server, and to the reconciler an admin key in the
    environment means "read fal's request list" (at fal's real address, by default); a
    test that makes admin calls from the settings sets FAL_ADMIN_KEY to `fal_sim.admin_key`.
    """
    env = client_env(home, "127.0.0.1", port)
    env.pop("FAL_ADMIN_KEY")
    return env


def _export_env_now() -> tuple[Path, socket.socket, int]:
    """Bind the port and export the env at plugin import: as early as a plugin can run."""
    home = Path(tempfile.mkdtemp(prefix="renderqueue-falsim-"))
    sock = bind_socket("127.0.0.1", 0)  # held from now on: nobody else can take the port
    port = sock.getsockname()[1]
    env = _session_env(home, port)
    if "fal_client" not in sys.modules:
        os.environ.update(env)
    return home, sock, port


_HOME, _SOCK, _PORT = _export_env_now()


def pytest_configure(config: pytest.Config) -> None:
    """Fail loudly if fal_client was imported (and froze its host) before this plugin loaded."""
    expected = f"127.0.0.1:{_PORT}"
    if "fal_client" in sys.modules:
        from fal_client.auth import FAL_QUEUE_RUN_HOST  # noqa: PLC0415 - only if already imported

        if expected != FAL_QUEUE_RUN_HOST:
            raise pytest.UsageError(
                "fal_client was imported before fal_sim_plugin could set FAL_QUEUE_RUN_HOST "
                f"(it points at {FAL_QUEUE_RUN_HOST!r}); load the plugin earlier "
                "(-p fal_sim_plugin) or do not import fal_client at conftest module level"
            )
    os.environ.update(_session_env(_HOME, _PORT))


def pytest_unconfigure(config: pytest.Config) -> None:
    _SOCK.close()  # a no-op once a simulator served (and closed) it
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def fal_simulator() -> Iterator[RunningSimulator]:
    """The session's simulator, on the port fal_client was configured with."""
    with running_simulator(_HOME, sock=_SOCK, seed=0, **FAST_TEST_OPTIONS) as sim:
        yield sim


@pytest.fixture
def fal_sim(fal_simulator: RunningSimulator) -> RunningSimulator:
    """The session simulator with clean state and fast default timings (seed 0)."""
    if not fal_simulator.running:  # a previous test stopped it
        fal_simulator.start()
    fal_simulator.control.reset(seed=0, **_fast_defaults())
    # settings cached by an earlier test may hold a key it set: read FAL_KEY afresh, since
    # the simulator accepts only its own key

    get_settings.cache_clear()
    return fal_simulator


def _fast_defaults() -> dict[str, object]:
    """Every knob back to its default, with test timings on top."""

    defaults = SimConfig().model_dump()
    defaults.update(FAST_TEST_OPTIONS)
    defaults.pop("seed")
    return defaults


@pytest.fixture
def webhook_sink() -> Iterator[WebhookSink]:
    """A recording webhook receiver on plain HTTP (127.0.0.1, random port)."""
    with running_webhook_sink() as sink:
        yield sink
