"""The prompts inbox: where the sensor looks for new files."""

from __future__ import annotations

import dagster as dg

from renderqueue_pipeline.batch.inbox import InboxFile, list_inbox


class PromptsInbox(dg.ConfigurableResource):
    """An fsspec folder URL (file://, s3://): RENDERQUEUE_PROMPTS_URL, by default a folder
    under RENDERQUEUE_HOME, filled when a run starts (`defs.resources.env_resources`)."""

    url: str

    def resolved_url(self) -> str:
        return self.url

    def list_files(self) -> list[InboxFile]:
        return list_inbox(self.url)
