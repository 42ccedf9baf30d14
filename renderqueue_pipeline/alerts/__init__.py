"""Alerts to a Slack-compatible webhook: budget thresholds (once each) and failed runs."""

from renderqueue_pipeline.alerts.budget import (
    AlertOutcome,
    AlertRun,
    alert_arguments,
    alert_body,
    alerts_for_month,
    evaluate_budget_alerts,
    set_alert_percents,
)
from renderqueue_pipeline.alerts.webhook import DeliveryError, post_with_retries, redact, url_label

__all__ = [
    "AlertOutcome",
    "AlertRun",
    "DeliveryError",
    "alert_arguments",
    "alert_body",
    "alerts_for_month",
    "evaluate_budget_alerts",
    "post_with_retries",
    "redact",
    "set_alert_percents",
    "url_label",
]
