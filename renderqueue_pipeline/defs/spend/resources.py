"""The spend domain's resources: fal's Platform API client, the billing check's limits."""

from __future__ import annotations

from typing import ClassVar

import dagster as dg
from pydantic import Field

from renderqueue_pipeline.defs.resources import EnvResource
from renderqueue_pipeline.fal_defaults import FAL_API_URL
from renderqueue_pipeline.fal_platform import FalPlatform


class FalPlatformResource(dg.ConfigurableResource):
    """fal's Platform APIs: the admin key (FAL_ADMIN_KEY, else FAL_KEY) and the base URL
    (RENDERQUEUE_FAL_API_URL). Filled from the environment when a run starts
    (`defs.resources.env_resources`); a key is never run config."""

    admin_key: str = Field(default="", repr=False)
    key: str = Field(default="", repr=False)
    api_url: str = FAL_API_URL

    def client(self) -> FalPlatform:
        """A client with the admin key; without one, FalPlatformAuthError names FAL_ADMIN_KEY."""
        if self.admin_key:
            return FalPlatform(self.admin_key, key_variable="FAL_ADMIN_KEY", base_url=self.api_url)
        return FalPlatform(self.key or None, key_variable="FAL_KEY", base_url=self.api_url)


class BillingCheckResource(EnvResource):
    """How the ledger is held against fal's bill, from the variables in `ENV`: a run's
    config (`grace_hours`, `threshold_percent`) overrides them for that run."""

    ENV: ClassVar[dict[str, dg.EnvVar]] = {
        "grace_hours": dg.EnvVar("RENDERQUEUE_BILLING_GRACE_HOURS"),
        "threshold_percent": dg.EnvVar("RENDERQUEUE_BILLING_THRESHOLD_PERCENT"),
    }

    grace_hours: float  # a completed generation with no billing event after this is a finding
    threshold_percent: float  # the month's difference with fal's bill that fails the check
