"""`renderqueue_pipeline.serving`: the one way the project serves an ASGI app from a thread."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import renderqueue_pipeline
from renderqueue_pipeline.serving import ServerThread, serve_in_thread


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"hello from {request.url.port}")


APP = Starlette(routes=[Route("/", _hello)])


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_a_server_on_port_zero_reports_the_port_it_got_and_answers_there() -> None:
    with ServerThread(APP, port=0, name="hello") as server:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert httpx.get(server.url + "/").text == f"hello from {server.port}"
        thread_names = [t.name for t in threading.enumerate()]
        assert f"hello:{server.port}" in thread_names
    assert _refused(server.port)
    assert f"hello:{server.port}" not in [t.name for t in threading.enumerate()]


def test_serve_in_thread_yields_the_base_url_and_stops_cleanly_on_exit() -> None:
    with serve_in_thread(APP) as url:
        port = int(url.rsplit(":", 1)[1])
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "/").status_code == 200
    assert _refused(port)


def test_a_server_can_be_started_only_once() -> None:
    server = ServerThread(APP, name="once").start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            server.start()
    finally:
        server.stop()


def test_an_app_that_cannot_start_raises_naming_the_server_and_frees_its_port() -> None:
    async def refuse(scope: dict, receive: object, send: object) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("no start")

    server = ServerThread(refuse, name="broken")
    with pytest.raises(RuntimeError, match=f"broken on 127.0.0.1:{server.port}"):
        server.start(timeout=10)
    assert _refused(server.port)


def test_only_serving_starts_uvicorn_in_a_thread() -> None:
    """One helper, not a copy per server: the package builds `uvicorn.Server` only in
    `serving.py` and in the receiver's foreground CLI (`webhook serve`, which forks
    workers and never runs in a thread)."""
    package = Path(renderqueue_pipeline.__file__).parent
    building = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if "uvicorn.Server(" in path.read_text()
    )
    assert building == ["serving.py", "webhook/cli.py"]
