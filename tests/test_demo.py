"""`make demo` runs `renderqueue demo`: the whole loop must work from a clean home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import psycopg


def test_demo_submits_receives_and_reports(
    ledger_url: str, conn: psycopg.Connection, tmp_path: Path
) -> None:
    parsed = urlparse(ledger_url)
    if not parsed.password and parsed.netloc.endswith(":@"):  # the embedded server trusts
        ledger_url = urlunparse(parsed._replace(netloc=f"{parsed.username}:demo-s3cret@"))
    env = {**os.environ, "DATABASE_URL": ledger_url, "RENDERQUEUE_HOME": str(tmp_path / "home")}
    run = subprocess.run(
        [sys.executable, "-m", "renderqueue_pipeline.cli", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    password = urlparse(ledger_url).password
    assert password and password not in run.stdout + run.stderr  # never printed
    assert "submitted 6 generations" in run.stdout and "success" in run.stdout
    rows = conn.execute("select status::text, cost_basis, cost_micros from generations").fetchall()
    assert len(rows) == 6
    assert all(r["status"] in ("completed", "failed") for r in rows)
    assert all(r["cost_basis"] == "requested" for r in rows if r["status"] == "completed")
    assert all(r["cost_micros"] == 0 for r in rows if r["status"] == "failed")
    assert (tmp_path / "home" / "dagster" / "dagster.yaml").read_text().count("postgres_url") == 1
