"""Test parts for the webhook receiver; fal's side lives in renderqueue_pipeline.webhook.testing."""

from __future__ import annotations

import contextlib
from typing import Any

from renderqueue_pipeline.serving import serve_in_thread
from renderqueue_pipeline.webhook.limits import server_options
from renderqueue_pipeline.webhook.testing import JwksServer, fal_body, jwk, signed_headers

__all__ = ["JwksServer", "fal_body", "jwk", "serving", "signed_headers"]


def serving(app: Any, **options: Any) -> contextlib.AbstractContextManager[str]:
    """Serve a receiver app with uvicorn in a thread, as `webhook serve` does; its base URL."""
    return serve_in_thread(app, **{**server_options(), **options})
