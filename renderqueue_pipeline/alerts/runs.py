"""The message for a failed Dagster run (Dagster's Slack run-failure pattern, plain JSON)."""

from __future__ import annotations

from typing import Any

MESSAGE_MAX_CHARS = 1500


def run_failure_body(
    job_name: str, run_id: str, message: str, run_url: str | None = None
) -> dict[str, Any]:
    """`{"text": ...}` plus the run's figures as fields; the error is cut to a screenful."""
    if len(message) > MESSAGE_MAX_CHARS:
        message = message[:MESSAGE_MAX_CHARS] + "…"
    fields = [("Job", job_name), ("Run", run_id)]
    if run_url:
        fields.append(("Run page", run_url))
    return {
        "text": f"Dagster run failed: job {job_name}, run {run_id[:8]}: {message}",
        "attachments": [
            {
                "color": "danger",
                "fields": [{"title": t, "value": v, "short": t != "Run page"} for t, v in fields],
            }
        ],
    }
