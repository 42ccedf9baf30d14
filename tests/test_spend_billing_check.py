"""Reconciling the ledger with fal's bill, against the simulator's Platform API."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import psycopg
import pytest
from spend_helpers import settle, submit, window

from renderqueue_pipeline.defs.reports.metadata import table_metadata
from renderqueue_pipeline.fal_gateway import FalSubmitOutcomeUnknown
from renderqueue_pipeline.ledger import LedgerEvent, record_event
from renderqueue_pipeline.reports.checks import report_matches_ledger
from renderqueue_pipeline.reports.spend import refresh_month
from renderqueue_pipeline.spend import (
    apply_billed,
    check_billing,
    load_billing_events,
    summarize,
)

SEEDANCE = "bytedance/seedance-2.0/text-to-video"
VEO = "fal-ai/veo3.1"
KLING = "fal-ai/kling-video/v3/turbo/pro/text-to-video"
#: fal's published per-second prices (shared/fal-wire.md), in dollars.
PUBLISHED = {
    (SEEDANCE, "720p", True): Decimal("0.3034"),
    (VEO, "720p", True): Decimal("0.40"),
    (VEO, "720p", False): Decimal("0.20"),
    (KLING, "720p", True): Decimal("0.14"),
}
ORDERS = [
    (SEEDANCE, {"prompt": "a lighthouse at dusk", "duration": "5"}),
    (SEEDANCE, {"prompt": "a fox in snow", "duration": "12", "resolution": "720p"}),
    (VEO, {"prompt": "rain on a tin roof", "duration": "8s"}),
    (VEO, {"prompt": "a quiet harbour", "duration": "6s", "generate_audio": False}),
    (KLING, {"prompt": "a paper boat", "duration": "10"}),
]


def expected_micros(endpoint: str, inputs: dict) -> int:
    key = (endpoint, inputs.get("resolution", "720p"), inputs.get("generate_audio", True))
    return int(PUBLISHED[key] * int(inputs["duration"].rstrip("s")) * 1_000_000)


def reconcile(conn: psycopg.Connection, fal_billing, **options) -> object:
    start, end = window()
    with fal_billing.platform() as platform:
        load_billing_events(conn, platform, start, end)
    result = check_billing(conn, start, end, **options)
    return result


def outcome_of(conn: psycopg.Connection, request_id: str) -> dict:
    return conn.execute(
        "select * from billing_reconciliation where request_id = %s", (request_id,)
    ).fetchone()


def test_right_billing_matches_to_the_micro_dollar(conn, fal_billing) -> None:
    ids = [submit(conn, endpoint, inputs) for endpoint, inputs in ORDERS]
    settle(conn, fal_billing.sim, ids)
    result = reconcile(conn, fal_billing)
    assert result.count("matched") == len(ORDERS)
    assert result.findings == 0
    expected = sum(expected_micros(endpoint, inputs) for endpoint, inputs in ORDERS)
    assert result.our_micros == result.fal_micros == expected
    assert result.difference_micros == 0

    start, end = window()
    assert apply_billed(conn, start, end) == len(ORDERS)
    rows = conn.execute(
        "select cost_micros, cost_basis, fal_billed_micros, computed_cost_micros"
        " from generations order by id"
    ).fetchall()
    for row, (endpoint, inputs) in zip(rows, ORDERS, strict=True):
        assert row["cost_basis"] == "billed"
        assert row["cost_micros"] == row["fal_billed_micros"] == expected_micros(endpoint, inputs)
        assert row["computed_cost_micros"] == expected_micros(endpoint, inputs)
    # idempotent: a second run changes nothing and still matches
    assert apply_billed(conn, start, end) == 0
    again = reconcile(conn, fal_billing)
    assert again.count("matched") == len(ORDERS)
    assert again.our_micros == expected


def test_units_mismatch_is_found_and_explained(conn, fal_billing) -> None:
    fal_billing.configure(units_mismatch_rate=1.0, units_mismatch_seconds=1.0)
    request_id = submit(conn, SEEDANCE, {"prompt": "a slow pan", "duration": "5"})
    settle(conn, fal_billing.sim, [request_id])
    result = reconcile(conn, fal_billing)
    assert result.count("amount_differs") == 1
    row = outcome_of(conn, request_id)
    assert row["reason"] == "units"
    assert (row["our_seconds"], row["fal_units"]) == (5, 6)
    assert row["fal_micros"] - row["our_micros"] == 303_400  # one second at $0.3034
    assert result.difference_micros == 303_400


def test_price_and_discount_mismatches_are_explained(conn, fal_billing) -> None:
    fal_billing.set_price(KLING, 0.15)  # fal raised the price; the ledger has not seen it
    fal_billing.configure(percent_discount={VEO: 10.0})
    kling = submit(conn, KLING, {"prompt": "a kite", "duration": "5"})
    veo = submit(conn, VEO, {"prompt": "a bell", "duration": "4s"})
    settle(conn, fal_billing.sim, [kling, veo])
    reconcile(conn, fal_billing)
    kling_row, veo_row = outcome_of(conn, kling), outcome_of(conn, veo)
    assert (kling_row["outcome"], kling_row["reason"]) == ("amount_differs", "price")
    assert (kling_row["our_micros"], kling_row["fal_micros"]) == (5 * 140_000, 5 * 150_000)
    assert (veo_row["outcome"], veo_row["reason"]) == ("amount_differs", "discount")
    assert veo_row["fal_micros"] == 4 * 400_000 * 90 // 100


def test_billed_but_failed_canceled_or_open_in_the_ledger(conn, fal_billing) -> None:
    failed, canceled, still_open = (
        submit(conn, SEEDANCE, {"prompt": f"shot {n}", "duration": "4"}) for n in range(3)
    )
    for request_id in (failed, canceled, still_open):
        fal_billing.sim.control.wait_finished(request_id, timeout=30)  # fal: all completed
    # the ledger heard otherwise (hand-edited), or nothing at all yet
    conn.execute("update generations set status = 'failed' where request_id = %s", (failed,))
    conn.execute("update generations set status = 'canceled' where request_id = %s", (canceled,))
    conn.commit()
    result = reconcile(conn, fal_billing)
    assert result.count("billed_not_completed") == 3
    reasons = {
        outcome_of(conn, r)["request_id"]: outcome_of(conn, r)["reason"]
        for r in (failed, canceled, still_open)
    }
    assert reasons == {failed: "failed", canceled: "canceled", still_open: "open"}
    assert result.fal_micros == 3 * 4 * 303_400
    assert result.our_micros == 0


def test_completed_but_not_billed_after_the_grace_period(conn, fal_billing) -> None:
    fal_billing.configure(billing_delay=3600)  # fal will bill in an hour
    request_id = submit(conn, SEEDANCE, {"prompt": "a comet", "duration": "4"})
    settle(conn, fal_billing.sim, [request_id])
    within = reconcile(conn, fal_billing, grace=dt.timedelta(hours=48))
    assert within.count("awaiting_billing") == 1
    assert within.findings == 0
    assert within.difference_micros == 0  # awaiting billing is left out of the difference
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=49)
    after = reconcile(conn, fal_billing, grace=dt.timedelta(hours=48), now=later)
    assert after.count("not_billed") == 1
    assert outcome_of(conn, request_id)["our_micros"] == 4 * 303_400


def test_late_billing_is_matched_on_a_later_run(conn, fal_billing) -> None:
    fal_billing.configure(billing_delay=2.0)
    request_id = submit(conn, SEEDANCE, {"prompt": "a tide", "duration": "4"})
    settle(conn, fal_billing.sim, [request_id])
    first = reconcile(conn, fal_billing)
    if first.count("matched") == 0:  # usually: fal has not published it yet
        assert first.count("awaiting_billing") == 1
    fal_billing.sim.control  # noqa: B018 (the simulator keeps running)
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    while dt.datetime.now(dt.UTC) < deadline:
        result = reconcile(conn, fal_billing)
        if result.count("matched") == 1:
            break
    assert result.count("matched") == 1
    assert result.findings == 0
    assert outcome_of(conn, request_id) is None  # matched: nothing to look at
    start, end = window()
    assert apply_billed(conn, start, end) == 1


def test_billed_requests_unknown_to_the_ledger_are_attributed(conn, fal_billing) -> None:

    fal_billing.sim.control.set_faults(api_500_rate=1.0)
    with pytest.raises(FalSubmitOutcomeUnknown):
        submit(conn, VEO, {"prompt": "a storm", "duration": "4s"})
    fal_billing.sim.control.set_faults(api_500_rate=0.0)
    (truth,) = fal_billing.sim.control.ground_truth()
    fal_billing.sim.control.wait_finished(truth["request_id"], timeout=30)
    now = dt.datetime.now(dt.UTC)
    fal_billing.add_events(
        [
            {
                "request_id": "someone-else-1",
                "endpoint_id": KLING,
                "timestamp": now.isoformat(),
                "output_units": 5,
                "unit_price": 0.14,
                "cost_estimate_nano_usd": 700_000_000,
            }
        ]
    )
    result = reconcile(conn, fal_billing)
    assert result.count("unknown_to_ledger") == 2
    item = conn.execute("select id from batch_items").fetchone()
    ours = outcome_of(conn, truth["request_id"])
    assert ours["batch_item_id"] == item["id"]
    assert "same endpoint" in ours["reason"]
    other = outcome_of(conn, "someone-else-1")
    assert other["batch_item_id"] is None
    assert "another system" in other["reason"]
    assert other["fal_micros"] == 700_000
    start, end = window()
    assert summarize(conn, start, end).count("unknown_to_ledger") == 2


def test_a_late_payload_keeps_fals_bill_and_puts_ours_beside_it(conn, fal_billing) -> None:
    """The webhook carried no payload (fal's payload_error), fal's bill was applied, then
    the reconciler fetched the result: the cost stays fal's figure, ours goes beside it."""
    request_id = submit(conn, SEEDANCE, {"prompt": "a kite", "duration": "auto"})
    truth = fal_billing.sim.control.wait_finished(request_id, timeout=30)
    assert truth["status"] == "completed"
    payloadless = LedgerEvent(request_id, "completed", None, error="payload_error")
    assert record_event(conn, payloadless) == "applied"
    reconcile(conn, fal_billing)
    start, end = window()
    assert apply_billed(conn, start, end) == 1
    billed = conn.execute(
        "select * from generations where request_id = %s", (request_id,)
    ).fetchone()
    assert billed["cost_basis"] == "billed"
    assert billed["computed_cost_basis"] == "estimate"

    fetched = LedgerEvent(request_id, "completed", truth["output"], source="reconcile")
    assert record_event(conn, fetched) == "applied"
    row = conn.execute("select * from generations where request_id = %s", (request_id,)).fetchone()
    assert row["outputs"] == truth["output"]
    assert (row["cost_basis"], row["cost_micros"]) == ("billed", billed["fal_billed_micros"])
    # ours: Seedance documents no output duration, so "auto" is priced at its default
    assert row["computed_cost_basis"] == "requested"
    assert row["computed_cost_micros"] == row["billed_seconds"] * 303_400
    assert row["cost_cents"] == (billed["fal_billed_micros"] + 5_000) // 10_000


def test_monthly_reports_show_our_total_fals_bill_and_the_difference(conn, fal_billing) -> None:
    """An "auto" clip is priced at Seedance's 15 s; fal bills the seconds it made. The
    month's report tables show both figures and the difference, and still equal the ledger."""

    fixed = submit(conn, SEEDANCE, {"prompt": "a lighthouse", "duration": "5"})
    auto = submit(conn, SEEDANCE, {"prompt": "a tide pool", "duration": "auto"})
    settle(conn, fal_billing.sim, [fixed, auto])
    created = conn.execute("select min(created_at) as t from generations").fetchone()["t"]
    month = created.astimezone(dt.UTC).date().replace(day=1)
    ours = {
        r["request_id"]: r["cost_micros"]
        for r in conn.execute("select request_id, cost_micros from generations")
    }
    assert ours[auto] == 15 * 303_400  # priced at the default: fal's output has no duration

    before = refresh_month(conn, month)
    assert before.computed_micros == before.cost_micros == sum(ours.values())
    assert before.fal_billed_micros is None
    assert before.billed_difference_micros is None

    reconcile(conn, fal_billing)
    start, end = window()
    assert apply_billed(conn, start, end) == 2
    fal = {
        r["request_id"]: r["fal_billed_micros"]
        for r in conn.execute("select request_id, fal_billed_micros from generations")
    }
    made = conn.execute(
        "select output_units from fal_billing_events where request_id = %s", (auto,)
    ).fetchone()["output_units"]
    assert 4 <= made <= 15  # "auto": fal bills the seconds it made
    assert fal[fixed] == ours[fixed]
    assert fal[auto] == made * 303_400

    after = refresh_month(conn, month)
    assert after.computed_micros == sum(ours.values())
    assert after.cost_micros == after.fal_billed_micros == sum(fal.values())
    assert after.billed_generations == 2
    assert after.billed_difference_micros == fal[auto] - ours[auto]
    (by_endpoint,) = [r for r in after.by_endpoint if r["endpoint"] == SEEDANCE]
    assert (
        by_endpoint["computed_micros"],
        by_endpoint["fal_billed_micros"],
        by_endpoint["billed_difference_micros"],
    ) == (sum(ours.values()), sum(fal.values()), fal[auto] - ours[auto])
    (daily,) = after.daily
    assert daily["billed_difference_micros"] == fal[auto] - ours[auto]
    for by in ("user", "endpoint"):
        assert report_matches_ledger(conn, month, by).passed
    # what the Dagster UI shows (and plots across months) for the month's tables

    shown = table_metadata(after, "spend_monthly_by_endpoint", after.by_endpoint)
    assert shown["fal_billed_usd"].value == sum(fal.values()) / 1_000_000
    assert shown["billed_difference_usd"].value == (fal[auto] - ours[auto]) / 1_000_000
    assert shown["computed_usd"].value == sum(ours.values()) / 1_000_000
