"""The simulator is as strict as fal about keys: a wrong key is 401 everywhere, the plain
key is refused where fal wants an admin key (Platform APIs, delete_io), and the keys it
generates at first start are the ones it prints and keeps."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import fal_client
import httpx
import pytest

from renderqueue_pipeline.simulator.platform import BillingBook, PlatformServer
from renderqueue_pipeline.simulator.server import client_env
from renderqueue_pipeline.simulator.testing import RunningSimulator, running_simulator

pytestmark = pytest.mark.timeout(120)

ENDPOINT = "bytedance/seedance-2.0/text-to-video"
APP = "bytedance/seedance-2.0"
INPUTS = {"prompt": "a tram crossing a bridge at dusk", "duration": "5", "resolution": "480p"}


def _key(value: str) -> dict[str, str]:
    return {"Authorization": f"Key {value}"}


def _http(sim: RunningSimulator) -> httpx.Client:
    return httpx.Client(
        base_url=sim.base_url, verify=ssl.create_default_context(cafile=sim.ca_bundle), timeout=60
    )


def test_a_wrong_key_is_refused_401_on_submit_status_result_and_cancel(
    fal_sim: RunningSimulator,
) -> None:
    request_id = fal_client.SyncClient(key=fal_sim.fal_key).submit(ENDPOINT, INPUTS).request_id
    fal_sim.control.wait_finished(request_id)
    calls = [
        ("POST", f"/{ENDPOINT}"),
        ("GET", f"/{APP}/requests/{request_id}/status"),
        ("GET", f"/{APP}/requests/{request_id}"),
        ("PUT", f"/{APP}/requests/{request_id}/cancel"),
    ]
    with _http(fal_sim) as http:
        for method, path in calls:
            for wrong in ("wrong", "simulator-key", fal_sim.fal_key + "x"):
                answer = http.request(method, path, json=INPUTS, headers=_key(wrong))
                assert answer.status_code == 401, (method, path, wrong, answer.text)
            assert http.request(method, path, json=INPUTS).status_code == 401  # no key
            for right in (fal_sim.fal_key, fal_sim.admin_key):
                answer = http.request(method, path, json=INPUTS, headers=_key(right))
                assert answer.status_code not in (401, 403), (method, path, answer.text)
    with pytest.raises(fal_client.client.FalClientHTTPError) as err:
        fal_client.SyncClient(key="wrong").submit(ENDPOINT, INPUTS)
    assert err.value.status_code == 401


@pytest.fixture
def platform(fal_sim: RunningSimulator) -> Iterator[PlatformServer]:
    """A Platform API server with no admin key configured: the simulator home's keys."""
    with PlatformServer(fal_sim.home, BillingBook(), port=0) as server:
        yield server


def test_the_plain_key_is_refused_on_every_platform_api_and_delete_io(
    fal_sim: RunningSimulator, platform: PlatformServer
) -> None:
    request_id = fal_client.SyncClient(key=fal_sim.fal_key).submit(ENDPOINT, INPUTS).request_id
    fal_sim.control.wait_finished(request_id)
    routes = [
        f"{platform.api_url}/models/pricing?endpoint_id={ENDPOINT}",
        f"{platform.api_url}/models/billing-events",
        f"{platform.api_url}/models/usage",
        f"{platform.api_url}/models/requests/by-endpoint?endpoint_id={ENDPOINT}",
    ]
    assert {r.path for r in platform.app.routes if r.path.startswith("/v1/")} == {
        httpx.URL(url).path for url in routes
    }  # every Platform API route of the simulator is covered here
    delete_io = f"{fal_sim.base_url}/requests/delete_io/{request_id}"
    with httpx.Client(
        verify=ssl.create_default_context(cafile=fal_sim.ca_bundle), timeout=60
    ) as http:
        for url in routes:
            assert http.get(url, headers=_key(fal_sim.fal_key)).status_code == 403, url
            assert http.get(url, headers=_key("wrong")).status_code == 401, url
            assert http.get(url).status_code == 401, url
            assert http.get(url, headers=_key(fal_sim.admin_key)).status_code == 200, url
        assert http.put(delete_io, headers=_key(fal_sim.fal_key)).status_code == 403
        assert http.put(delete_io, headers=_key("wrong")).status_code == 401
        answer = http.put(delete_io, headers=_key(fal_sim.admin_key))
        assert answer.status_code == 200
        assert answer.json()["CDN_DELETE_RESULTS"]


def test_the_generated_keys_persist_across_a_restart_with_the_same_home(tmp_path: Path) -> None:
    with running_simulator(tmp_path) as sim:
        first = (sim.fal_key, sim.admin_key)
        assert first[0] != first[1]
        assert "simulator-key" not in first
        sim.restart()
        with _http(sim) as http:
            answer = http.post(f"/{ENDPOINT}", json=INPUTS, headers=_key(first[0]))
        assert answer.status_code == 200
    keys_file = tmp_path / "simulator" / "api_keys.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    with running_simulator(tmp_path) as again:  # a new server, same home
        assert (again.fal_key, again.admin_key) == first
        with _http(again) as http:
            ok = http.post(f"/{ENDPOINT}", json=INPUTS, headers=_key(first[0]))
        assert ok.status_code == 200
    with running_simulator(tmp_path / "other") as other:  # another home, other keys
        assert {other.fal_key, other.admin_key}.isdisjoint(first)


def _exports(text: str) -> dict[str, str]:
    pairs = (line.removeprefix("export ").split("=", 1) for line in text.splitlines() if line)
    return {name: value.strip("'") for name, value in pairs}


def test_simulator_env_and_print_env_print_the_generated_keys(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAL_")}
    env["RENDERQUEUE_HOME"] = str(tmp_path)
    cli = [sys.executable, "-m", "renderqueue_pipeline.cli", "simulator"]

    def run(*args: str) -> dict[str, str]:
        done = subprocess.run(
            [*cli, *args], env=env, capture_output=True, text=True, check=True, timeout=90
        )
        return _exports(done.stdout)

    printed = run("env", "--port", "9911")
    assert printed == run("serve", "--port", "9911", "--print-env")
    expected = client_env(tmp_path, "127.0.0.1", 9911)
    assert (printed["FAL_KEY"], printed["FAL_ADMIN_KEY"]) == (
        expected["FAL_KEY"],
        expected["FAL_ADMIN_KEY"],
    )
    assert printed["FAL_KEY"] != printed["FAL_ADMIN_KEY"]
    with running_simulator(tmp_path) as sim:  # the keys it serves with are the printed ones
        with _http(sim) as http:
            answer = http.post(f"/{ENDPOINT}", json=INPUTS, headers=_key(printed["FAL_KEY"]))
        assert answer.status_code == 200


def test_processes_starting_at_once_on_a_new_home_agree_on_the_keys(tmp_path: Path) -> None:
    go = tmp_path / "go"
    code = (  # every child imports first, then all start together when `go` appears
        "import os, sys; from pathlib import Path;"
        "from renderqueue_pipeline.simulator.keys import ApiKeys\n"
        "while not os.path.exists(sys.argv[2]): pass\n"
        "k = ApiKeys.load_or_create(Path(sys.argv[1])); print(k.fal_key, k.admin_key)"
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "simulator"), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(1)  # not a race in the test: only makes a real race between them likely
    go.write_text("")
    printed = {child.communicate(timeout=60)[0].strip() for child in children}
    assert len(printed) == 1
    assert all(child.returncode == 0 for child in children)
    assert sorted((tmp_path / "simulator").iterdir()) == [tmp_path / "simulator" / "api_keys.json"]
