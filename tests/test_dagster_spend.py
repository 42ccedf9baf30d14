"""The spend assets on a real Dagster instance with Postgres storage, against the simulator."""

from __future__ import annotations

import datetime as dt

import dagster as dg
from spend_helpers import ADMIN_KEY, settle, submit

from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.defs.spend.assets import (
    billing_reconciliation,
    billing_reconciliation_monthly,
    fal_billing_events,
    fal_prices,
)
from renderqueue_pipeline.defs.spend.resources import BillingCheckResource, FalPlatformResource
from renderqueue_pipeline.defs.spend.schedules import (
    billing_month_schedule,
    reconcile_billing_schedule,
)
from renderqueue_pipeline.settings import load_settings

SEEDANCE = "bytedance/seedance-2.0/text-to-video"


def test_a_day_is_loaded_reconciled_and_checked_monthly(
    conn, ledger_url, fal_billing, dagster_storage
) -> None:
    ids = [submit(conn, SEEDANCE, {"prompt": f"scene {n}", "duration": "6"}) for n in range(3)]
    settle(conn, fal_billing.sim, ids)
    # the day under test is the day fal billed our requests (read from its bill, not from
    # the clock: a run may cross 00:00 UTC between the submits and here)
    billed = [e.timestamp for e in fal_billing.book.events() if e.request_id in ids]
    assert len(billed) == 3
    moment = dt.datetime.fromtimestamp(min(billed), dt.UTC)
    fal_billing.add_events(
        [
            {
                "request_id": "not-ours",
                "endpoint_id": SEEDANCE,
                "timestamp": moment.isoformat(),
                "output_units": 4,
                "unit_price": 0.3034,
            }
        ]
    )
    resources = {
        "ledger": LedgerDatabase(url=ledger_url),
        "fal_platform": FalPlatformResource(admin_key=ADMIN_KEY, api_url=fal_billing.api_url),
        "billing_check": BillingCheckResource.from_settings(load_settings()),
    }
    day = moment.date()
    assert {dt.datetime.fromtimestamp(t, dt.UTC).date() for t in billed} == {day}, (
        "fal billed the three requests on two days (submitted across 00:00 UTC)"
    )
    storage = {"storage": {"postgres": {"postgres_url": dagster_storage}}}
    with dg.instance_for_test(overrides=storage) as instance:
        daily = dg.materialize(
            [fal_billing_events, billing_reconciliation],
            partition_key=day.isoformat(),
            resources=resources,
            instance=instance,
        )
        assert daily.success
        loaded = daily.asset_materializations_for_node("fal_billing_events")[0].metadata
        assert loaded["dagster/partition_row_count"].value == 4
        reconciled = daily.asset_materializations_for_node("billing_reconciliation")[0].metadata
        assert reconciled["by_outcome"].value["matched"] == 3
        assert reconciled["generations_billed_now"].value == 3

        monthly = dg.materialize(
            [billing_reconciliation_monthly],
            partition_key=day.replace(day=1).isoformat(),
            resources=resources,
            instance=instance,
        )
        checks = {c.check_name: c for c in monthly.get_asset_check_evaluations()}
        assert checks["no_billed_request_unknown_to_ledger"].passed is False
        # 4 s unknown to the ledger against 18 s of ours: far over 0.5 %
        assert checks["monthly_billing_difference_under_threshold"].passed is False
        summary = monthly.asset_materializations_for_node("billing_reconciliation_monthly")
        assert summary[0].metadata["difference_micros"].value == 4 * 303_400

        prices = dg.materialize([fal_prices], resources=resources, instance=instance)
        (check,) = prices.get_asset_check_evaluations()
        assert check.check_name == "fal_price_units_are_representable"
        assert check.passed
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"


def test_schedules_ask_for_the_last_days_and_their_months(dagster_storage) -> None:
    when = dt.datetime(2026, 12, 2, 5, 30, tzinfo=dt.UTC)
    storage = {"storage": {"postgres": {"postgres_url": dagster_storage}}}
    with dg.instance_for_test(overrides=storage) as instance:
        context = dg.build_schedule_context(instance=instance, scheduled_execution_time=when)
        days = reconcile_billing_schedule(context)
        months = billing_month_schedule(context)
    assert [r.partition_key for r in days] == ["2026-12-01", "2026-11-30", "2026-11-29"]
    assert len({r.run_key for r in days}) == 3
    assert [r.partition_key for r in months] == ["2026-11-01", "2026-12-01"]
