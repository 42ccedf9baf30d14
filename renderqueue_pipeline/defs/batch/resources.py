"""The prompts inbox: where the sensor looks for new files."""

from __future__ import annotations

import dagster as dg

from renderqueue_pipeline.batch.inbox import InboxFile, list_inbox
from renderqueue_pipeline.settings import get_settings


class PromptsInbox(dg.ConfigurableResource):
    """An fsspec folder URL (file://, s3://); empty means RENDERQUEUE_PROMPTS_URL."""

    url: str = ""

    def resolved_url(self) -> str:

        return self.url or get_settings().prompts

    def list_files(self) -> list[InboxFile]:
        return list_inbox(self.resolved_url())


@dg.definitions
def batch_resources() -> dg.Definitions:
    return dg.Definitions(resources={"prompts_inbox": PromptsInbox()})
