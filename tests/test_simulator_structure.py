"""The simulator's apps keep their handlers at module level and their state on `app.state`."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import Mount

from renderqueue_pipeline.simulator.app import build_app
from renderqueue_pipeline.simulator.config import SimConfig
from renderqueue_pipeline.simulator.platform import BillingBook, build_platform_app


def _endpoints(routes: list) -> list:
    found = []
    for route in routes:
        if isinstance(route, Mount):
            found += _endpoints(route.routes)
        else:
            found.append(route.endpoint)
    return found


def test_no_simulator_handler_is_defined_inside_build_app(tmp_path: Path) -> None:
    app = build_app(tmp_path, SimConfig())
    names = [endpoint.__qualname__ for endpoint in _endpoints(app.routes)]
    assert len(names) >= 10
    assert [name for name in names if "<locals>" in name] == []


def test_no_platform_handler_is_defined_inside_build_platform_app() -> None:
    app = build_platform_app(BillingBook())
    names = [endpoint.__qualname__ for endpoint in _endpoints(app.routes)]
    assert len(names) == 12
    # the four fal routes are `api(handler)`: a wrapper around a module-level handler
    assert [name for name in names if "build_platform_app" in name] == []


def test_two_simulator_apps_share_no_state(tmp_path: Path) -> None:
    first: Starlette = build_app(tmp_path, SimConfig(seed=1))
    second: Starlette = build_app(tmp_path, SimConfig(seed=2))
    assert first.state.engine is not second.state.engine
    assert first.state.engine.config.seed == 1
    assert second.state.engine.config.seed == 2
    book_a, book_b = BillingBook(), BillingBook()
    assert build_platform_app(book_a).state.book is book_a
    assert build_platform_app(book_b).state.book is book_b
