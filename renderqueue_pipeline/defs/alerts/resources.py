"""Where alerts go and when a budget alert fires."""

from __future__ import annotations

from typing import ClassVar

import dagster as dg
from pydantic import Field

from renderqueue_pipeline.defs.resources import EnvResource
from renderqueue_pipeline.settings import parse_alert_percents


class AlertsResource(EnvResource):
    """The alert webhook (a secret: Slack's URLs carry their token) and the default
    thresholds, from the variables in `ENV`."""

    ENV: ClassVar[dict[str, dg.EnvVar]] = {
        "webhook_url": dg.EnvVar("RENDERQUEUE_ALERT_WEBHOOK_URL"),
        "percents": dg.EnvVar("RENDERQUEUE_BUDGET_ALERT_PERCENTS"),
    }

    webhook_url: str = Field(default="", repr=False)  # empty: alerts are not sent
    percents: str

    def default_percents(self) -> tuple[int, ...]:
        """The thresholds of a user without their own, in percent of the budget."""
        return parse_alert_percents(self.percents)
