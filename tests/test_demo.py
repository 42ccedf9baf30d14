"""`renderqueue demo --headless`: the whole flow from a clean home, checked against fal's truth."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest


@pytest.mark.timeout(400)
def test_headless_demo_runs_the_whole_flow_and_matches_ground_truth(
    ledger_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "DATABASE_URL": ledger_url, "RENDERQUEUE_HOME": str(home)}
    for name in ("FAL_KEY", "RENDERQUEUE_WEBHOOK_URL", "RENDERQUEUE_STORAGE_URL"):
        env.pop(name, None)
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "renderqueue_pipeline.cli", "demo", "--headless"],
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
    )
    took = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "ledger matches the simulator's ground truth" in run.stdout
    assert took < 180, f"the headless demo took {took:.0f} s (promised: under 3 minutes)"
    # the sample file's bad rows are rejected with their reasons, the rest submitted
    items = conn.execute(
        "select line_no, state, reason from batch_items order by line_no"
    ).fetchall()
    rejected = {r["line_no"]: r["reason"] for r in items if r["state"] == "rejected"}
    assert "over the monthly budget" in rejected[25]
    assert "missing or empty" in rejected[34]
    assert "no price" in rejected[35]
    assert {r["state"] for r in items} <= {"submitted", "rejected"}
    completed = conn.execute(
        "select archive_status, archive_url from generations where status = 'completed'"
    ).fetchall()
    assert completed and all(r["archive_status"] == "archived" for r in completed)
    assert all(Path(r["archive_url"].removeprefix("file://")).is_file() for r in completed)
    assert (home / "dagster" / "dagster.yaml").read_text().count("postgres") >= 1

    again = subprocess.run(
        [sys.executable, "-m", "renderqueue_pipeline.cli", "demo", "--headless"],
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
    )
    # the same sample file again adds nothing twice
    count = conn.execute("select count(*) as n from batch_items").fetchone()["n"]
    assert count == len(items), again.stdout[-3000:]
