"""Our faults are 503s, never 4xx: a read-only, an unmigrated and an unprivileged database.

fal does not retry a 4xx, so a 4xx for a genuine delivery is a lost event. Each fault is
caused for real on its own database; after it is fixed, fal's retries (the simulator's,
shortened) land every event exactly once.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlparse, urlunparse

import fal_client
import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ledger_helpers import SEEDANCE, submit_row
from webhook_helpers import JwksServer, fal_body, serving, signed_headers

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.simulator.testing import FAST_TEST_OPTIONS, RunningSimulator, wait_until
from renderqueue_pipeline.webhook.app import ReceiverConfig, create_app


@dataclass
class Fault:
    """A database the receiver uses (`receiver_url`), broken until `fix()`."""

    admin_url: str  # the same database, as its owner: to write rows and to look
    receiver_url: str
    migrated: bool
    fix: Callable[[], None]


def _database_name(url: str) -> str:
    return urlparse(url).path.lstrip("/")


def _as_role(url: str, role: str, password: str) -> str:
    parsed = urlparse(url)
    host = parsed.netloc.rsplit("@", 1)[-1]
    return urlunparse(parsed._replace(netloc=f"{role}:{password}@{host}"))


@contextlib.contextmanager
def read_only(make_database, admin_url: str) -> Iterator[Fault]:
    """What a failover to a standby looks like to new connections."""
    url = make_database()
    migrate(url)
    name = _database_name(url)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'alter database "{name}" set default_transaction_read_only = on')

    def fix() -> None:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'alter database "{name}" reset default_transaction_read_only')

    # the test's own writes say so explicitly (new sessions default to read-only)
    yield Fault(
        url + ("&" if "?" in url else "?") + "options=-c%20default_transaction_read_only%3Doff",
        url,
        True,
        fix,
    )


@contextlib.contextmanager
def unmigrated(make_database, admin_url: str) -> Iterator[Fault]:
    url = make_database()
    yield Fault(url, url, False, lambda: migrate(url))


@contextlib.contextmanager
def unprivileged(make_database, admin_url: str) -> Iterator[Fault]:
    """A role that may connect but was never granted the ledger's tables."""
    url = make_database()
    migrate(url)
    role, password = f"rq_nopriv_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"create role {role} login password '{password}'")

    def fix() -> None:  # what `renderqueue db grant receiver` gives a login
        with psycopg.connect(url, autocommit=True) as owner:
            owner.execute(f"grant renderqueue_receiver to {role}")

    try:
        yield Fault(url, _as_role(url, role, password), True, fix)
    finally:
        with psycopg.connect(url, autocommit=True) as owner:
            owner.execute(f"drop owned by {role}")
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"drop role if exists {role}")


FAULTS = {"read-only": read_only, "not migrated": unmigrated, "no privilege": unprivileged}
LEAKS = ("read-only", "read only", "rq_record_events", "permission", "does not exist", "rq_test_")


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_our_database_faults_are_503_without_database_text(
    make_database, admin_url: str, fault: str
) -> None:
    key = Ed25519PrivateKey.generate()
    jwks = JwksServer(key)
    try:
        with FAULTS[fault](make_database, admin_url) as broken:
            request_id = f"req-{uuid.uuid4().hex}"
            if broken.migrated:
                with connect(broken.admin_url) as conn:
                    request_id, _ = submit_row(conn)
            config = ReceiverConfig(broken.receiver_url, jwks.url, insecure_jwks=True)
            with serving(create_app(config)) as url, httpx.Client(timeout=30) as client:
                body = fal_body(request_id)

                def deliver() -> httpx.Response:
                    headers = signed_headers(key, body, request_id)
                    return client.post(f"{url}/webhooks/fal", content=body, headers=headers)

                for _ in range(2):  # and again on the reconnected flusher
                    answer = deliver()
                    assert answer.status_code == 503, answer.text
                    assert answer.headers["retry-after"]
                    assert not [leak for leak in LEAKS if leak in answer.text], answer.text
                broken.fix()
                assert deliver().status_code in (200, 202)
                assert deliver().json()["outcome"] == "duplicate"
            with connect(broken.admin_url) as conn:
                events = conn.execute(
                    "select count(*) as n from generation_events where request_id = %s",
                    (request_id,),
                ).fetchone()
            assert events["n"] == 1
    finally:
        jwks.stop()


def _refused_then_delivered(sim: RunningSimulator, request_ids: list[str]) -> bool:
    attempts = sim.control.webhook_attempts()
    return all(
        any(a["request_id"] == r and a["outcome"] == "delivered" for a in attempts)
        for r in request_ids
    )


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_after_the_fault_is_fixed_fal_retries_land_every_event_once(
    fal_sim: RunningSimulator, make_database, admin_url: str, fault: str
) -> None:

    fal_sim.control.reset(
        seed=8,
        **{
            **FAST_TEST_OPTIONS,
            "run_time": "0.05:0.1",
            "webhook_retry_base": 0.2,
            "webhook_retry_max": 0.5,
            "webhook_max_attempts": 100,
        },
    )
    with FAULTS[fault](make_database, admin_url) as broken:
        config = ReceiverConfig(broken.receiver_url, fal_sim.jwks_url)
        with serving(create_app(config)) as receiver:
            request_ids = []
            for i in range(5):
                handle = fal_client.submit(
                    SEEDANCE,
                    arguments={"prompt": f"shot {i}", "duration": "5"},
                    webhook_url=f"{receiver}/webhooks/fal",
                )
                request_ids.append(handle.request_id)
            if broken.migrated:  # rows as the submit path would have written them
                with connect(broken.admin_url) as conn:
                    for request_id in request_ids:
                        submit_row(conn, request_id)

            def refused_each() -> bool:
                attempts = fal_sim.control.webhook_attempts()
                return all(
                    any(a["request_id"] == r and a["status_code"] == 503 for a in attempts)
                    for r in request_ids
                )

            wait_until(refused_each, timeout=60, interval=0.1)
            attempts = fal_sim.control.webhook_attempts()
            mine = [a for a in attempts if a["request_id"] in request_ids]
            assert {a["status_code"] for a in mine} == {503}, "a 4xx would be a lost event"
            broken.fix()
            wait_until(lambda: _refused_then_delivered(fal_sim, request_ids), timeout=60)
        with connect(broken.admin_url) as conn:
            stored = conn.execute(
                "select request_id, count(*) as n from generation_events "
                "where request_id = any(%s) group by request_id",
                (request_ids,),
            ).fetchall()
            statuses = conn.execute(
                "select status from generations where request_id = any(%s)", (request_ids,)
            ).fetchall()
    assert sorted(r["request_id"] for r in stored) == sorted(request_ids)
    assert all(r["n"] == 1 for r in stored)
    if broken.migrated:
        assert [s["status"] for s in statuses] == ["completed"] * 5


def test_late_retries_that_keep_their_first_timestamp_still_land_once(
    fal_sim: RunningSimulator, make_database, admin_url: str
) -> None:
    """fal may sign every retry with the first attempt's timestamp. After an outage longer
    than the ±300 s window, those retries must still land (for requests we submitted)."""

    fal_sim.control.reset(
        seed=9,
        **{
            **FAST_TEST_OPTIONS,
            "webhook_retry_base": 0.2,
            "webhook_retry_max": 0.5,
            "webhook_max_attempts": 100,
            "webhook_keep_timestamp": True,
            "webhook_clock_skew": -400.0,  # as if the first attempt was 400 s ago
            "run_time": "2:3",  # our rows are written before the first attempt
        },
    )
    with read_only(make_database, admin_url) as broken:
        config = ReceiverConfig(broken.receiver_url, fal_sim.jwks_url)
        with serving(create_app(config)) as receiver:

            def submit(i: int) -> str:
                return fal_client.submit(
                    SEEDANCE,
                    arguments={"prompt": f"late {i}", "duration": "5"},
                    webhook_url=f"{receiver}/webhooks/fal",
                ).request_id

            ours = [submit(i) for i in range(3)]
            stranger = submit(99)  # no generation row: a late delivery for it is refused
            with connect(broken.admin_url) as conn:
                for request_id in ours:
                    submit_row(conn, request_id)

            def refused_each() -> bool:
                attempts = fal_sim.control.webhook_attempts()
                return all(
                    any(a["request_id"] == r and a["status_code"] == 503 for a in attempts)
                    for r in ours
                )

            wait_until(refused_each, timeout=60, interval=0.1)
            broken.fix()
            wait_until(lambda: _refused_then_delivered(fal_sim, ours), timeout=60)
            wait_until(
                lambda: any(
                    a["request_id"] == stranger and a["status_code"] == 401
                    for a in fal_sim.control.webhook_attempts()
                ),
                timeout=60,
            )
        attempts = [a for a in fal_sim.control.webhook_attempts() if a["request_id"] in ours]
        assert {a["status_code"] for a in attempts} <= {503, 200}
        with connect(broken.admin_url) as conn:
            stored = conn.execute(
                "select request_id, count(*) as n from generation_events "
                "where request_id = any(%s) group by request_id",
                ([*ours, stranger],),
            ).fetchall()
            statuses = conn.execute(
                "select status::text from generations where request_id = any(%s)", (ours,)
            ).fetchall()
    assert sorted(r["request_id"] for r in stored) == sorted(ours)  # the stranger: nothing
    assert all(r["n"] == 1 for r in stored)
    assert [s["status"] for s in statuses] == ["completed"] * 3
