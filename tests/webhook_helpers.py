"""Test parts for the webhook receiver; fal's side lives in renderqueue_pipeline.webhook.testing.

Registered as a plugin in conftest.py: the `webhook_url` fixture is there for every test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from renderqueue_pipeline.serving import serve_in_thread
from renderqueue_pipeline.simulator.testing import RunningSimulator
from renderqueue_pipeline.webhook.app import ReceiverConfig, create_app
from renderqueue_pipeline.webhook.limits import server_options
from renderqueue_pipeline.webhook.testing import JwksServer, fal_body, jwk, signed_headers

__all__ = ["JwksServer", "fal_body", "jwk", "serving", "signed_headers"]


def serving(app: Any, **options: Any) -> contextlib.AbstractContextManager[str]:
    """Serve a receiver app with uvicorn in a thread, as `webhook serve` does; its base URL."""
    return serve_in_thread(app, **{**server_options(), **options})


@pytest.fixture
def webhook_url(
    fal_sim: RunningSimulator, ledger_url: str, settings_env: Callable[..., None]
) -> Iterator[str]:
    """A real receiver on the ledger, set as RENDERQUEUE_WEBHOOK_URL: batch submissions ask
    fal to deliver to it. The setting goes before the receiver stops."""

    with serving(create_app(ReceiverConfig(ledger_url, fal_sim.jwks_url))) as url:
        settings_env(RENDERQUEUE_WEBHOOK_URL=f"{url}/webhooks/fal")
        try:
            yield f"{url}/webhooks/fal"
        finally:
            settings_env(RENDERQUEUE_WEBHOOK_URL=None)
