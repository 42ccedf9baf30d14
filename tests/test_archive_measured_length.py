"""An "auto" clip priced from the length its archived file states (issue 21, part 4)."""

from __future__ import annotations

from decimal import Decimal

from archive_helpers import Behaviour, completed_row, media_server, row, video
from spend_helpers import settle, submit, window

from renderqueue_pipeline.archive import (
    ArchiveOptions,
    ArchiveSetup,
    ArchiveStorage,
    archive_pending,
    run_archive,
)
from renderqueue_pipeline.archive.fetch import FetchPolicy, parse_hosts
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.settings import load_settings
from renderqueue_pipeline.spend import apply_billed, check_billing, load_billing_events

SEEDANCE = "bytedance/seedance-2.0/text-to-video"
AUTO = {"prompt": "a lighthouse at dusk", "duration": "auto"}
#: fal's published Seedance 2.0 720p price with audio (shared/fal-wire.md), micro-dollars/s
SEEDANCE_720P = 303_400


def reconcile_and_apply_bill(conn, fal_billing) -> object:
    start, end = window()
    with fal_billing.platform() as platform:
        load_billing_events(conn, platform, start, end)
    result = check_billing(conn, start, end)
    apply_billed(conn, start, end)
    return result


def test_an_auto_clip_is_priced_from_the_length_of_its_archived_file(
    conn, ledger_url, fal_billing, ledger_env, archive_root
) -> None:
    rid = submit(conn, SEEDANCE, AUTO)
    settle(conn, fal_billing.sim, [rid])
    truth = fal_billing.sim.control.ground_truth(rid)
    produced = Decimal(str(truth["billed_seconds"]))
    before = row(conn, rid)
    assert (before["cost_basis"], before["billed_seconds"]) == ("requested", 15)

    report = run_archive(lambda: connect(ledger_url), ArchiveSetup.from_settings(load_settings()))
    assert report.archived == 1
    assert report.outcomes[0].priced == "measured"

    after = row(conn, rid)
    assert after["cost_basis"] == "measured"
    assert after["measured_seconds"] == after["billed_seconds"] == produced
    assert after["cost_micros"] == produced * SEEDANCE_720P
    assert after["cost_cents"] == round(produced * SEEDANCE_720P / 10_000)
    assert after["measured_seconds_problem"] is None

    # fal's bill still wins when it arrives, and it agrees with the measurement
    result = reconcile_and_apply_bill(conn, fal_billing)
    assert result.count("matched") == 1
    assert result.difference_micros == 0
    billed = row(conn, rid)
    assert billed["cost_basis"] == "billed"
    assert billed["cost_micros"] == billed["fal_billed_micros"] == after["cost_micros"]
    assert (billed["computed_cost_basis"], billed["computed_cost_micros"]) == (
        "measured",
        after["cost_micros"],
    )


def test_a_billed_clip_keeps_fals_figure_when_its_length_is_measured_later(
    conn, ledger_url, fal_billing, ledger_env, archive_root
) -> None:
    rid = submit(conn, SEEDANCE, AUTO)
    settle(conn, fal_billing.sim, [rid])
    produced = Decimal(str(fal_billing.sim.control.ground_truth(rid)["billed_seconds"]))
    reconcile_and_apply_bill(conn, fal_billing)
    billed = row(conn, rid)
    assert (billed["cost_basis"], billed["computed_cost_basis"]) == ("billed", "requested")

    report = run_archive(lambda: connect(ledger_url), ArchiveSetup.from_settings(load_settings()))
    assert report.archived == 1
    assert report.outcomes[0].priced == "billed"
    after = row(conn, rid)
    # fal's figure stands; ours beside it is now the measured one, equal to fal's
    assert (after["cost_basis"], after["cost_micros"]) == ("billed", billed["fal_billed_micros"])
    assert after["billed_seconds"] == billed["billed_seconds"]
    assert after["computed_cost_basis"] == "measured"
    assert after["computed_cost_micros"] == produced * SEEDANCE_720P == after["fal_billed_micros"]
    assert after["measured_seconds"] == produced


def test_a_clip_whose_length_cannot_be_read_keeps_its_estimate_with_the_reason(
    conn, ledger_url, ledger_env, archive_root
) -> None:
    with media_server("127.0.0.1") as origin:
        url = origin.serve("/files/x/output.mp4", Behaviour(size=5000))  # not ISO-BMFF bytes
        rid = completed_row(conn, video(url, 5000))
        before = row(conn, rid)
        report = archive_pending(
            lambda: connect(ledger_url),
            ArchiveStorage.from_url(f"file://{archive_root}"),
            FetchPolicy(loopback_hosts=parse_hosts(origin.netloc)),
            ArchiveOptions(),
        )
    assert report.archived == 1
    assert report.outcomes[0].priced == "unreadable"
    after = row(conn, rid)
    assert after["archive_status"] == "archived"
    assert (after["cost_basis"], after["cost_micros"], after["billed_seconds"]) == (
        before["cost_basis"],
        before["cost_micros"],
        before["billed_seconds"],
    )
    assert after["measured_seconds"] is None
    assert after["measured_seconds_problem"].startswith("not an MP4 file")
