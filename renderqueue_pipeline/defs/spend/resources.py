"""The spend domain's resource: fal's Platform API client."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

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
