"""The archive against the fal simulator's CDN: TLS, lifecycles, 404 after expiry, delete-IO."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path

import httpx
from archive_helpers import row

from renderqueue_pipeline.archive import ArchiveSetup, archive_health, run_archive
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.defs.archive.checks import no_outputs_lost
from renderqueue_pipeline.defs.archive.resources import ArchiveResource
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.fal_gateway import FalGateway
from renderqueue_pipeline.ledger import LedgerEvent, record_event
from renderqueue_pipeline.ledger.core import _asubmit_generation
from renderqueue_pipeline.settings import load_settings
from renderqueue_pipeline.simulator.testing import RunningSimulator, wait_until

ENDPOINT = "bytedance/seedance-2.0/text-to-video"
INPUTS = {"prompt": "a lighthouse at dusk", "duration": "4", "resolution": "480p"}


def _complete(ledger_url: str, fal_sim: RunningSimulator, lifetimes: list[float | None]):
    """Submit one generation per lifetime through the gateway; record each result."""

    async def one(lifetime: float | None) -> tuple[str, dict]:
        with connect(ledger_url) as conn:
            async with FalGateway(object_lifetime=lifetime, retry_initial=0.01) as fal:
                rid = await _asubmit_generation(
                    conn, fal.submit, user_id=3, endpoint=ENDPOINT, inputs=INPUTS
                )
                # polls fal's status over HTTP: there is no event to wait on
                while not (await fal.status(ENDPOINT, rid)).done:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                output = await fal.result(ENDPOINT, rid)
            record_event(conn, LedgerEvent(rid, "completed", output, source="api"))
            conn.commit()
            return rid, output

    async def main():
        return [await one(lifetime) for lifetime in lifetimes]

    return asyncio.run(main())


def _cdn_status(fal_sim: RunningSimulator, url: str) -> int:
    return httpx.head(
        url, verify=ssl.create_default_context(cafile=fal_sim.ca_bundle), timeout=10
    ).status_code


def test_outputs_from_the_simulators_cdn_are_archived_and_expired_ones_lost(
    conn, ledger_url, fal_sim, ledger_env, archive_root
) -> None:
    (short, short_out), (kept, kept_out) = _complete(ledger_url, fal_sim, [1.0, 3600.0])
    assert row(conn, short)["fal_expires_at"] is not None
    short_url = short_out["video"]["url"]
    # wait until fal's copy is really gone (event-based: the CDN answers 404)
    wait_until(lambda: _cdn_status(fal_sim, short_url) == 404, timeout=60, interval=0.2)

    report = run_archive(lambda: connect(ledger_url), ArchiveSetup.from_settings(load_settings()))
    assert (report.archived, report.lost) == (1, 1)

    kept_row = row(conn, kept)
    expected = hashlib.sha256(
        httpx.get(
            kept_out["video"]["url"],
            verify=ssl.create_default_context(cafile=fal_sim.ca_bundle),
            timeout=30,
        ).content
    ).hexdigest()
    assert kept_row["archive_status"] == "archived"
    assert kept_row["archive_sha256"] == expected
    assert kept_row["archive_bytes"] == kept_out["video"]["file_size"]
    assert Path(kept_row["archive_url"].removeprefix("file://")).is_file()

    lost_row = row(conn, short)
    assert (lost_row["archive_status"], lost_row["archive_failure"]) == ("lost", "gone")
    assert "404" in lost_row["archive_error"]
    health = archive_health(conn)
    assert health["lost"] == 1
    assert health["failures_by_reason"] == {"lost:gone": 1}

    check = no_outputs_lost(
        ledger=LedgerDatabase(url=ledger_url),
        archive=ArchiveResource.from_settings(load_settings()),
    )
    assert check.passed is False
    assert check.metadata["lost"].value == 1
    assert short in check.metadata["latest_lost"].value


def test_fals_copy_is_deleted_after_a_safe_archive_and_failures_retried(
    conn, ledger_url, fal_sim, ledger_env, archive_root, settings_env
) -> None:

    settings_env(
        RENDERQUEUE_DELETE_FAL_COPY="1",
        FAL_ADMIN_KEY=fal_sim.admin_key,  # delete_io refuses the plain key
    )
    [(rid, output)] = _complete(ledger_url, fal_sim, [3600.0])
    url = output["video"]["url"]
    fal_sim.control.set_faults(admin_key="wrong-key-on-purpose")

    def gateway() -> FalGateway:  # the one `renderqueue archive run` makes
        return FalGateway.from_settings(load_settings())

    first = run_archive(
        lambda: connect(ledger_url),
        ArchiveSetup.from_settings(load_settings()),
        fal_gateway=gateway,
    )
    assert first.archived == 1
    assert first.fal_delete["fal_deletes_retrying"] == 1
    r = row(conn, rid)
    assert r["archive_status"] == "archived"  # a failed deletion never touches the archive
    assert (r["fal_delete_status"], r["fal_delete_attempts"]) == ("pending", 1)
    assert r["fal_delete_error"]
    assert _cdn_status(fal_sim, url) == 200

    fal_sim.control.set_faults(admin_key=None)
    conn.execute(
        "update generations set fal_delete_next_attempt_at = now() where request_id = %s", (rid,)
    )
    conn.commit()
    second = run_archive(
        lambda: connect(ledger_url),
        ArchiveSetup.from_settings(load_settings()),
        fal_gateway=gateway,
    )
    assert second.fal_delete["fal_copies_deleted"] == 1
    r = row(conn, rid)
    assert (r["fal_delete_status"], r["fal_deleted_at"] is not None) == ("deleted", True)
    answer = conn.execute(
        "select fal_delete_answer from generation_files f join generations g "
        "on g.id = f.generation_id where g.request_id = %s",
        (rid,),
    ).fetchone()
    assert answer["fal_delete_answer"] == "deleted"
    assert _cdn_status(fal_sim, url) == 404
    assert Path(r["archive_url"].removeprefix("file://")).is_file()
