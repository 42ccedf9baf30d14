"""Freshness checks: a late spend or billing asset is a failed asset check.

The UI shows each as "fresh" or "overdue" beside the asset; the sensor below runs them
(default RUNNING) whenever one may have turned late, so nobody has to open the UI for a
late asset to become a failed check that an alert sensor can post.
"""

from __future__ import annotations

import dagster as dg

from renderqueue_pipeline.defs.freshness.policies import (
    BILLING_DEADLINE_CRON,
    BILLING_WINDOW,
    CURRENT_MONTH_MAX_AGE,
)

CURRENT_MONTH_ASSETS = [
    "monthly_spend_by_user",
    "monthly_spend_by_endpoint",
    "monthly_spend_by_batch",
    "daily_spend",
    "spend_report_files",
    "spend_forecast",
]
DAILY_BILLING_ASSETS = ["fal_billing_events", "billing_reconciliation"]

current_month_freshness_checks = dg.build_last_update_freshness_checks(
    assets=CURRENT_MONTH_ASSETS,
    lower_bound_delta=CURRENT_MONTH_MAX_AGE,
    severity=dg.AssetCheckSeverity.ERROR,
)
daily_billing_freshness_checks = dg.build_last_update_freshness_checks(
    assets=DAILY_BILLING_ASSETS,
    lower_bound_delta=BILLING_WINDOW,
    deadline_cron=BILLING_DEADLINE_CRON,
    timezone="UTC",
    severity=dg.AssetCheckSeverity.ERROR,
)
FRESHNESS_CHECKS = [*current_month_freshness_checks, *daily_billing_freshness_checks]

freshness_checks_sensor = dg.build_sensor_for_freshness_checks(
    freshness_checks=FRESHNESS_CHECKS,
    minimum_interval_seconds=120,
    name="freshness_checks_sensor",
    default_status=dg.DefaultSensorStatus.RUNNING,
)
