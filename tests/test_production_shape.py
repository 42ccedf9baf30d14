"""The production shape on one machine: separate processes, as a deployment runs them.

A gRPC code server, dagster-webserver and dagster-daemon reaching it through a workspace
file, the fal simulator, and two webhook receivers on one database. Checked through the
webserver's GraphQL API and the ledger, never through in-process shortcuts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest
from rich.console import Console

from renderqueue_pipeline.dev import running_stack, wait_for_run

pytestmark = pytest.mark.e2e  # whole-product runs: `make test`, not `make test-fast`

LOCATION_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus
    locationOrLoadError { __typename
      ... on PythonError { message }
      ... on RepositoryLocation { repositories { name
          jobs { name }
          sensors { name sensorState { status } }
          schedules { name scheduleState { status } }
          assetNodes { assetKey { path } } } } } } } } }
"""

LAUNCH = """
mutation($selector: JobOrPipelineSelector!, $config: RunConfigData) {
  launchRun(executionParams: {selector: $selector, runConfigData: $config}) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""


# Submits through the real fal-client in a fresh interpreter (fal-client reads the
# simulator's host at import), alternating the two receivers as webhook targets.
SUBMIT_SCRIPT = """
import asyncio, json, os, sys
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.fal_gateway import FalGateway
from renderqueue_pipeline.ledger.core import _asubmit_generation

hooks = json.loads(sys.argv[1])

async def main():
    async with FalGateway() as fal:
        async def one(n):
            async def submit(endpoint, inputs):
                hook = hooks[n % len(hooks)]
                return (await fal.submit(endpoint, inputs, webhook_url=hook)).request_id
            with connect(os.environ["DATABASE_URL"]) as conn:
                return await _asubmit_generation(
                    conn, submit, user_id=500 + n % 3,
                    endpoint="bytedance/seedance-2.0/fast/text-to-video",
                    inputs={"prompt": f"production shape {n}", "duration": "4",
                            "resolution": "480p"})
        ids = await asyncio.gather(*(one(n) for n in range(int(sys.argv[2]))))
    print(json.dumps(ids))

asyncio.run(main())
"""


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _graphql(base: str, query: str, variables: dict | None = None) -> dict:
    response = httpx.post(
        f"{base}/graphql", json={"query": query, "variables": variables or {}}, timeout=60
    )
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body
    return body["data"]


@pytest.mark.timeout(600)
def test_separate_processes_load_launch_and_share_one_ledger(
    ledger_url: str,
    conn: psycopg.Connection,
    tmp_path: Path,
    settings_env: Callable[..., None],
    dev_logins_lock: None,
) -> None:

    home = tmp_path / "home"
    approved = tmp_path / "approved"  # the launchpad may name files under this prefix
    approved.mkdir()
    settings_env(
        DATABASE_URL=ledger_url,
        RENDERQUEUE_HOME=str(home),
        FAL_KEY=None,
        RENDERQUEUE_PROMPT_SOURCES=approved.as_uri(),
    )
    ui, code = _free_ports(2)  # dagster-webserver and the code server cannot say theirs
    with running_stack(
        home,
        console=Console(quiet=True),
        ui_port=ui,
        webhook_ports=(0, 0),  # each receiver binds a free port and says which
        code_server_port=code,
    ) as env:
        base = f"http://127.0.0.1:{ui}"
        entry = _wait_for_location(base)
        repo = entry["locationOrLoadError"]["repositories"][0]
        jobs = {j["name"] for j in repo["jobs"]}
        assert "ledger_status_job" in jobs

        launched = _graphql(
            base,
            LAUNCH,
            {
                "selector": {
                    "repositoryLocationName": "renderqueue",
                    "repositoryName": repo["name"],
                    "jobName": "ledger_status_job",
                },
                "config": {},
            },
        )["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        assert wait_for_run(base, launched["run"]["runId"]) == "SUCCESS"

        prompts = approved / "launchpad.csv"
        prompts.write_text(
            "prompt,user_id\n" + "".join(f"launchpad shot {n},{700 + n}\n" for n in range(4))
        )
        batch = _graphql(
            base,
            LAUNCH,
            {
                "selector": {
                    "repositoryLocationName": "renderqueue",
                    "repositoryName": repo["name"],
                    "jobName": "submit_batch",
                },
                "config": {
                    "ops": {
                        "submit_prompts_file": {
                            "config": {
                                "file_url": prompts.as_uri(),
                                "default_endpoint": "bytedance/seedance-2.0/fast/text-to-video",
                                "default_inputs": {"duration": "4", "resolution": "480p"},
                            }
                        }
                    }
                },
            },
        )["launchRun"]
        assert batch["__typename"] == "LaunchRunSuccess", batch
        assert wait_for_run(base, batch["run"]["runId"]) == "SUCCESS"
        launched_rows = conn.execute(
            "select count(*) as n from batch_items i join batches b on b.id = i.batch_id "
            "where b.source like %s and i.state = 'submitted'",
            ("%launchpad.csv",),
        ).fetchone()["n"]
        assert launched_rows == 4

        receivers = env["RECEIVER_URLS"].split()
        assert len(receivers) == 2
        hooks = [f"{url}/webhooks/fal" for url in receivers]
        submitted = subprocess.run(
            [sys.executable, "-c", SUBMIT_SCRIPT, json.dumps(hooks), "12"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert submitted.returncode == 0, submitted.stderr
        request_ids = json.loads(submitted.stdout.strip().splitlines()[-1])
        _wait_for_terminal(conn, request_ids)
        received = {url: _metric(f"{url}/metrics") for url in receivers}
        assert all(count > 0 for count in received.values()), received
        stored = conn.execute(
            "select request_id, count(*) as n from generation_events "
            "where request_id = any(%s) group by request_id",
            (request_ids,),
        ).fetchall()
        assert len(stored) == len(request_ids)
        assert all(row["n"] == 1 for row in stored), stored
        # the receivers and Dagster connect as their logins, never as the owner
        assert psycopg.conninfo.conninfo_to_dict(env["DATABASE_URL"])["user"] == "rq_pipeline"
        others = conn.execute(
            "select distinct usename from pg_stat_activity "
            "where datname = current_database() and pid <> pg_backend_pid()"
        ).fetchall()
        users = {row["usename"] for row in others}
        assert "rq_receiver" in users, users
        assert users <= {"rq_receiver", "rq_pipeline"}, users
    leftover = subprocess.run(
        ["pgrep", "-f", str(home)], capture_output=True, text=True
    ).stdout.split()
    assert str(os.getpid()) not in leftover, leftover
    assert not leftover, leftover


def _wait_for_location(base: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        data = _graphql(base, LOCATION_QUERY)["workspaceOrError"]
        entries = {e["name"]: e for e in data["locationEntries"]}
        entry = entries.get("renderqueue")
        if entry and entry["loadStatus"] == "LOADED":
            assert entry["locationOrLoadError"]["__typename"] == "RepositoryLocation", entry
            return entry
        assert time.monotonic() < deadline, data
        time.sleep(1)


def _wait_for_terminal(conn: psycopg.Connection, request_ids: list[str], timeout=120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.rollback()
        open_rows = conn.execute(
            "select count(*) as n from generations where request_id = any(%s) "
            "and status in ('submitted', 'in_progress')",
            (request_ids,),
        ).fetchone()["n"]
        if open_rows == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"{open_rows} generations still open after {timeout} s")


def _metric(url: str) -> float:
    """Deliveries a receiver answered (sum of its per-code counter)."""
    total = 0.0
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith("renderqueue_webhook_deliveries_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total
