"""`renderqueue simulator serve` as a user runs it, and the harness's start/stop/restart."""

from __future__ import annotations

import os
import shlex
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from renderqueue_pipeline.serving import free_port
from renderqueue_pipeline.simulator.testing import running_simulator, wait_until

pytestmark = pytest.mark.timeout(60)

RENDERQUEUE = [sys.executable, "-m", "renderqueue_pipeline.cli"]

# fal-client's README examples, verbatim
README_RUN = """
import fal_client

response = fal_client.run("fal-ai/fast-sdxl", arguments={"prompt": "a cute cat, realistic, orange"})
print(response["images"][0]["url"])
"""
README_QUEUE = """
import asyncio
import fal_client

async def main():
    response = await fal_client.submit_async("fal-ai/fast-sdxl", arguments={"prompt": "a cute cat, realistic, orange"})

    logs_index = 0
    async for event in response.iter_events(with_logs=True):
        if isinstance(event, fal_client.Queued):
            print("Queued. Position:", event.position)
        elif isinstance(event, (fal_client.InProgress, fal_client.Completed)):
            new_logs = event.logs[logs_index:]
            for log in new_logs:
                print(log["message"])
            logs_index = len(event.logs)

    result = await response.get()
    print(result["images"][0]["url"])


asyncio.run(main())
"""  # noqa: E501 (verbatim from fal-client's README)


def _clean_env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FAL_") and k not in ("SSL_CERT_FILE",)
    }
    env["RENDERQUEUE_HOME"] = str(home)
    return env


def _parse_exports(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = shlex.split(value)[0]
    return env


@pytest.mark.timeout(400)  # four cold CLI starts: slow on a loaded 2-core machine
@pytest.mark.e2e
def test_serve_prints_env_at_once_and_runs_readme_examples(tmp_path: Path) -> None:
    port = free_port()
    platform_port = free_port()  # the Platform API's (default --port + 1 may be taken)
    out = tmp_path / "sim.out"
    env = _clean_env(tmp_path / "home")
    with out.open("w") as handle:  # output to a file: must still be flushed at once
        proc = subprocess.Popen(
            [
                *RENDERQUEUE,
                "simulator",
                "serve",
                "--port",
                str(port),
                "--platform-port",
                str(platform_port),
                "--queue-delay",
                "0.05",
                "--run-time",
                "0.2",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        exports = wait_until(
            lambda: t if "FAL_JWKS_URL" in (t := out.read_text()) else None, timeout=90
        )
        client = _parse_exports(exports)
        assert set(client) >= {"FAL_QUEUE_RUN_HOST", "SSL_CERT_FILE", "FAL_KEY", "FAL_JWKS_URL"}
        assert client["FAL_QUEUE_RUN_HOST"] == f"127.0.0.1:{port}"
        assert Path(client["SSL_CERT_FILE"]).is_relative_to(tmp_path / "home" / "simulator")

        printed = subprocess.run(
            [
                *RENDERQUEUE,
                "simulator",
                "serve",
                "--port",
                str(port),
                "--platform-port",
                str(platform_port),
                "--print-env",
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=90,
        ).stdout
        assert _parse_exports(printed) == client

        wait_until(lambda: _healthy(client), timeout=90)
        for example in (README_RUN, README_QUEUE):
            # eval "$(renderqueue simulator serve --print-env)"; python example.py
            script = tmp_path / "example.py"
            script.write_text(textwrap.dedent(example))
            print_env = shlex.join([*RENDERQUEUE, "simulator", "serve", "--port", str(port)])
            shell = f'eval "$({print_env} --print-env)" && {shlex.quote(sys.executable)} {script}'
            done = subprocess.run(
                ["bash", "-c", shell], capture_output=True, text=True, env=env, timeout=180
            )
            assert done.returncode == 0, done.stderr
            assert (
                done.stdout.strip().splitlines()[-1].startswith(f"https://127.0.0.1:{port}/files/")
            )
        assert "Generation complete" in done.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    # uvicorn shuts down cleanly, then re-raises the signal it captured
    assert proc.returncode in (0, -signal.SIGTERM)


def _healthy(client: dict[str, str]) -> bool:
    try:
        url = f"https://{client['FAL_QUEUE_RUN_HOST']}/_sim/health"
        return (
            httpx.get(
                url, verify=ssl.create_default_context(cafile=client["SSL_CERT_FILE"])
            ).status_code
            == 200
        )
    except httpx.HTTPError:
        return False


def test_serve_rejects_bad_knobs(tmp_path: Path) -> None:
    done = subprocess.run(
        [*RENDERQUEUE, "simulator", "serve", "--port", "0", "--queue-delay", "5:1"],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path),
        timeout=30,
    )
    assert done.returncode == 2
    assert "B must be >= A" in done.stderr


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with running_simulator(tmp_path) as sim:
        done = subprocess.run(
            [*RENDERQUEUE, "simulator", "serve", "--port", str(sim.port)],
            capture_output=True,
            text=True,
            env=_clean_env(tmp_path),
            timeout=30,
        )
    assert done.returncode == 2
    assert done.stderr.startswith("renderqueue: fal simulator cannot listen on")


def test_harness_stop_restart_and_no_leaks(tmp_path: Path) -> None:
    before = {t.name for t in threading.enumerate()}
    with running_simulator(tmp_path, seed=4, queue_delay="0", run_time="0") as sim:
        port, cert = sim.port, sim.cert_path.read_bytes()
        jwks = httpx.get(
            sim.jwks_url, verify=ssl.create_default_context(cafile=sim.ca_bundle)
        ).json()
        assert sim.control.health()["seed"] == 4
        sim.restart(seed=9)
        assert sim.port == port
        assert sim.control.health()["seed"] == 9
        # keys and certificate survive restarts (clients keep trusting, receivers keep verifying)
        assert sim.cert_path.read_bytes() == cert
        assert (
            httpx.get(sim.jwks_url, verify=ssl.create_default_context(cafile=sim.ca_bundle)).json()
            == jwks
        )
        sim.stop()
        assert not sim.running
        with pytest.raises(httpx.ConnectError):
            httpx.get(
                f"{sim.base_url}/_sim/health",
                verify=ssl.create_default_context(cafile=sim.ca_bundle),
            )
        sim.start()
        assert sim.control.health()["requests"] == 0
    time.sleep(0.1)
    leaked = {t.name for t in threading.enumerate()} - before
    assert not [name for name in leaked if name.startswith("fal-simulator")]
