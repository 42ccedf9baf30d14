"""The spend domain's resource: fal's Platform API client."""

from __future__ import annotations

import dagster as dg

from renderqueue_pipeline.fal_platform import FalPlatform
from renderqueue_pipeline.settings import get_settings


class FalPlatformResource(dg.ConfigurableResource):
    """fal's Platform APIs. Empty fields mean the environment: FAL_ADMIN_KEY (else FAL_KEY)
    and RENDERQUEUE_FAL_API_URL, read when a run starts (never put in run config)."""

    admin_key: str = ""
    api_url: str = ""

    def client(self) -> FalPlatform:

        overrides = {"base_url": self.api_url} if self.api_url else {}
        if self.admin_key:
            settings = get_settings()
            return FalPlatform(
                self.admin_key,
                key_variable="FAL_ADMIN_KEY",
                **{"base_url": settings.fal_api_url or "https://api.fal.ai/v1", **overrides},
            )
        return FalPlatform.from_settings(**overrides)


@dg.definitions
def spend_resources() -> dg.Definitions:
    return dg.Definitions(resources={"fal_platform": FalPlatformResource()})
