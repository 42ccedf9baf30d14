"""Alerts to RENDERQUEUE_ALERT_WEBHOOK_URL: budget thresholds and failed runs (thin)."""

import dagster as dg

from renderqueue_pipeline.alerts import evaluate_budget_alerts, post_with_retries
from renderqueue_pipeline.alerts.runs import run_failure_body
from renderqueue_pipeline.defs.alerts.resources import AlertsResource
from renderqueue_pipeline.defs.resources import LedgerDatabase


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Posts each budget threshold a user crosses this month (spent + in flight; "
    "RENDERQUEUE_BUDGET_ALERT_PERCENTS or the user's own) once to "
    "RENDERQUEUE_ALERT_WEBHOOK_URL, recorded in `budget_alerts`; retries failed posts with "
    "backoff. The tick's message says what it sent and what waits for a retry.",
)
def budget_alert_sensor(
    context: dg.SensorEvaluationContext, ledger: LedgerDatabase, alerts: AlertsResource
):
    with ledger.connect() as conn:
        run = evaluate_budget_alerts(
            conn, url=alerts.webhook_url, default_percents=alerts.default_percents()
        )
    for outcome in run.sent:
        context.log.info(f"sent: {outcome.text}")
    for outcome in run.failed:
        context.log.warning(
            f"not delivered (attempt {outcome.attempts}): user {outcome.user_id} "
            f"{outcome.threshold_percent}%: {outcome.error}"
        )
    return dg.SkipReason(run.summary())


@dg.run_failure_sensor(
    name="run_failure_alert_sensor",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Posts every failed run of this code location's jobs to "
    "RENDERQUEUE_ALERT_WEBHOOK_URL (Dagster's Slack run-failure pattern, as plain JSON).",
)
def run_failure_alert_sensor(context: dg.RunFailureSensorContext, alerts: AlertsResource):
    run = context.dagster_run
    if not alerts.webhook_url:
        return dg.SkipReason(
            f"run {run.run_id} of {run.job_name} failed; RENDERQUEUE_ALERT_WEBHOOK_URL is not set"
        )
    message = context.failure_event.message or "the run failed"
    post_with_retries(alerts.webhook_url, run_failure_body(run.job_name, run.run_id, message))
    context.log.info(f"posted the failure of run {run.run_id} ({run.job_name})")
    return None
