"""The current month's spend forecast, refreshed hourly, with a budget warning check.

Not partitioned: a forecast is a statement about the month now, and a past month's figure
is its report. One asset keeps the forecast's history as one series of materializations,
so the UI plots each user's forecast and budget over the month.
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from renderqueue_pipeline.batch.budget import default_limit_micros
from renderqueue_pipeline.defs.freshness.policies import current_month_policy
from renderqueue_pipeline.defs.ledger.assets import generations
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.defs.shared import domain_tags
from renderqueue_pipeline.money import dollars, micros_to_usd
from renderqueue_pipeline.reports.forecast import Forecast, forecast_month, markdown

GROUP = "forecast"
CHECK = "forecast_within_budget"
#: Users plotted one by one (the costliest first); the tables list every user.
PLOTTED_USERS = 50


def forecast_metadata(forecast: Forecast) -> dict[str, Any]:
    """Numbers under stable keys (the UI plots them across materializations) and tables."""
    metadata: dict[str, Any] = {
        "month": f"{forecast.month:%Y-%m}",
        "as_of": dg.MetadataValue.timestamp(forecast.as_of),
        "days_left": dg.MetadataValue.float(round(forecast.days_left, 4)),
        "month_to_date_usd": dg.MetadataValue.float(micros_to_usd(forecast.month_to_date_micros)),
        "forecast_usd": dg.MetadataValue.float(micros_to_usd(forecast.forecast_micros)),
        "forecast": dollars(forecast.forecast_micros),
        "users_over_budget": len(forecast.over_budget),
        "by_user": dg.MetadataValue.md(markdown(forecast, "user")),
        "by_endpoint": dg.MetadataValue.md(markdown(forecast, "endpoint")),
    }
    for row in forecast.by_user[:PLOTTED_USERS]:
        metadata[f"user_{row.key}_forecast_usd"] = dg.MetadataValue.float(
            micros_to_usd(row.forecast_micros)
        )
        if row.budget_micros is not None:
            metadata[f"user_{row.key}_budget_usd"] = dg.MetadataValue.float(
                micros_to_usd(row.budget_micros)
            )
    return metadata


def budget_check(forecast: Forecast) -> dg.AssetCheckResult:
    """WARN: the users whose forecast passes their budget (the spend is not yet there)."""
    over = forecast.over_budget
    listing = "\n".join(
        f"| {r.key} | {dollars(r.forecast_micros)} | {dollars(r.budget_micros or 0)} |"
        for r in over
    )
    return dg.AssetCheckResult(
        check_name=CHECK,
        passed=not over,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{len(over)} user(s) forecast past their budget: "
            + ", ".join(str(r.key) for r in over)
            if over
            else "every user's forecast is within their budget"
        ),
        metadata={
            "users_over_budget": dg.MetadataValue.json([r.key for r in over]),
            "over_budget": dg.MetadataValue.md(
                "| user | forecast | budget |\n|---|---:|---:|\n" + listing
            ),
        },
    )


@dg.asset(
    deps=[generations],
    group_name=GROUP,
    kinds={"postgres"},
    check_specs=[
        dg.AssetCheckSpec(
            CHECK,
            asset="spend_forecast",
            description="No user's month-end forecast passes their budget (a warning).",
        )
    ],
    freshness_policy=current_month_policy,
)
def spend_forecast(ledger: LedgerDatabase) -> dg.MaterializeResult:
    """The current UTC month: month-to-date spend plus the last 7 days' daily rate for the
    days left, by user (beside the budget) and by endpoint (docs/reports.md)."""

    with ledger.connect() as conn:
        forecast = forecast_month(conn, default_budget_micros=default_limit_micros())
    return dg.MaterializeResult(
        metadata=forecast_metadata(forecast), check_results=[budget_check(forecast)]
    )


spend_forecast_job = dg.define_asset_job(
    "spend_forecast_job",
    selection=[spend_forecast],
    description="Forecast the current month's spend by user and endpoint; warn on budgets.",
    tags=domain_tags("reports"),
)


@dg.schedule(
    job=spend_forecast_job,
    cron_schedule="20 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Refresh the month-end forecast every hour.",
)
def spend_forecast_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    moment = context.scheduled_execution_time
    return dg.RunRequest(run_key=f"forecast@{moment:%Y-%m-%dT%H:%M}" if moment else None)
