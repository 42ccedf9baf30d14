"""The receiver never migrates: it runs as `renderqueue_receiver`, checks the schema at start
and answers 503 (fal retries) until `renderqueue db migrate` has run, and says why on /healthz.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import sql
from webhook_helpers import JwksServer, fal_body, serving, signed_headers

from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.db.roles import grant_login, login_url
from renderqueue_pipeline.simulator.testing import wait_until
from renderqueue_pipeline.webhook.app import ReceiverConfig, create_app


def _deliver(client: httpx.Client, base: str, key: Ed25519PrivateKey, request_id: str):
    body = fal_body(request_id)
    return client.post(
        f"{base}/webhooks/fal", content=body, headers=signed_headers(key, body, request_id)
    )


def test_deliveries_get_503_until_the_database_is_migrated_then_are_stored(
    make_database: Callable[[], str],
) -> None:
    url = make_database()  # empty: never migrated
    key = Ed25519PrivateKey.generate()
    jwks = JwksServer(key)
    app = create_app(ReceiverConfig(url, jwks.url, jwks_min_refresh=0.5, insecure_jwks=True))
    try:
        with serving(app) as base, httpx.Client(timeout=30) as client:
            answer = _deliver(client, base, key, "req-before-migrate")
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "5"
            assert answer.json() == {"outcome": "schema_not_current"}
            health = client.get(f"{base}/healthz")
            assert health.status_code == 503
            assert health.headers["retry-after"] == "5"
            assert health.json()["schema"] == "migrations_missing"
            assert health.json()["first_missing"] == "000_baseline"
            assert health.json()["fix"] == "renderqueue db migrate"
            database = url.rsplit("/", 1)[1].split("?")[0]
            assert database not in answer.text + health.text  # no database text
            with psycopg.connect(url) as conn:  # the receiver did not migrate
                assert conn.execute("select to_regclass('schema_migrations')").fetchone() == (None,)

            migrate(url)
            wait_until(
                lambda: _deliver(client, base, key, "req-after-migrate").status_code == 202,
                timeout=10,
            )
            assert client.get(f"{base}/healthz").status_code == 200
            checks = app.state.schema.checks
            for n in range(5):  # once current, never asked again
                _deliver(client, base, key, f"req-current-{n}")
            assert app.state.schema.checks == checks
    finally:
        jwks.stop()


@pytest.fixture
def receiver_login(ledger_url: str) -> Iterator[tuple[str, str]]:
    """(login name, password) of a fresh receiver login; dropped afterwards."""
    name, password = f"rq_test_hook_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    yield name, password
    with psycopg.connect(ledger_url, autocommit=True) as conn:
        for (database,) in conn.execute(
            "select datname from pg_database where has_database_privilege(%s, oid, 'connect')"
            " and not datistemplate",
            (name,),
        ).fetchall():
            conn.execute(
                sql.SQL("revoke connect on database {} from {}").format(
                    sql.Identifier(database), sql.Identifier(name)
                )
            )
        conn.execute(sql.SQL("drop role if exists {}").format(sql.Identifier(name)))


@pytest.mark.timeout(180)
def test_webhook_serve_runs_as_the_receiver_role_and_waits_for_the_migration(
    make_database: Callable[[], str], receiver_login: tuple[str, str], tmp_path: Path
) -> None:
    url = make_database()
    name, password = receiver_login
    grant_login(url, "receiver", name, password)
    key = Ed25519PrivateKey.generate()
    jwks = JwksServer(key)
    env = {
        **os.environ,
        "DATABASE_URL": login_url(url, name, password),
        "FAL_JWKS_URL": jwks.url,
        "RENDERQUEUE_HOME": str(tmp_path),
    }
    log = (tmp_path / "receiver.log").open("w+")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "renderqueue_pipeline.cli",
            "webhook",
            "serve",
            "--port",
            "0",
            "--insecure-jwks",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = _wait_for_port(process, tmp_path / "receiver.log")
        with httpx.Client(timeout=30) as client:
            health = client.get(f"{base}/healthz")
            assert health.status_code == 503, health.text
            assert health.json()["schema"] == "migrations_missing"
            assert _deliver(client, base, key, "req-cli-1").status_code == 503

            migrate(url)  # the owner's step, `renderqueue db migrate`
            wait_until(
                lambda: _deliver(client, base, key, "req-cli-2").status_code == 202, timeout=15
            )
            assert client.get(f"{base}/healthz").status_code == 200
        with psycopg.connect(url) as conn:
            stored = conn.execute(
                "select request_id from generation_events where request_id like 'req-cli-%'"
            ).fetchall()
        assert stored == [("req-cli-2",)]
        log.seek(0)
        text = log.read()
        assert password not in text
        assert "answering 503 until `renderqueue db migrate` has run" in text
    finally:
        process.terminate()
        process.wait(30)
        log.close()
        jwks.stop()


def _wait_for_port(process: subprocess.Popen, log: Path, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return found.group(1)
        assert process.poll() is None, log.read_text()
        time.sleep(0.2)
    raise AssertionError(f"the receiver did not start: {log.read_text()}")
