"""Spend schedules: prices daily; billing for the last days (late events, the grace period)
and the month they fall in."""

from __future__ import annotations

import datetime as dt

import dagster as dg

from renderqueue_pipeline.defs.shared import START_DATE
from renderqueue_pipeline.defs.spend.jobs import (
    reconcile_billing,
    refresh_fal_prices,
    summarize_billing_month,
)

#: Days reconciled again on every tick: fal's events can appear late, and "not billed"
#: only becomes a finding after the grace period (48 h by default).
DAYS_BACK = 3


@dg.schedule(
    job=refresh_fal_prices,
    cron_schedule="0 5 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def fal_prices_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    day = context.scheduled_execution_time.date().isoformat()
    return dg.RunRequest(run_key=f"fal_prices@{day}")


@dg.schedule(
    job=reconcile_billing,
    cron_schedule="30 5 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def reconcile_billing_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
    """Yesterday and the days before it (capped at DAYS_BACK runs per tick)."""
    today = context.scheduled_execution_time.date()
    days = [today - dt.timedelta(days=n) for n in range(1, DAYS_BACK + 1)]
    return [
        dg.RunRequest(
            run_key=f"{day.isoformat()}@{today.isoformat()}", partition_key=day.isoformat()
        )
        for day in days
        if day >= START_DATE
    ]


@dg.schedule(
    job=summarize_billing_month,
    cron_schedule="0 7 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def billing_month_schedule(context: dg.ScheduleEvaluationContext) -> list[dg.RunRequest]:
    """The month (or two months) of the days just reconciled."""
    today = context.scheduled_execution_time.date()
    months = sorted(
        {(today - dt.timedelta(days=n)).replace(day=1) for n in range(1, DAYS_BACK + 1)}
    )
    return [
        dg.RunRequest(
            run_key=f"{month.isoformat()}@{today.isoformat()}", partition_key=month.isoformat()
        )
        for month in months
        if month >= START_DATE
    ]
