"""Where report files go: RENDERQUEUE_STORAGE_URL (any fsspec URL)."""

import dagster as dg


class ReportStorage(dg.ConfigurableResource):
    """Root of the report files (RENDERQUEUE_STORAGE_URL; by default a folder under
    RENDERQUEUE_HOME), filled when a run starts (`defs.resources.env_resources`)."""

    url: str

    def resolved_url(self) -> str:
        return self.url
