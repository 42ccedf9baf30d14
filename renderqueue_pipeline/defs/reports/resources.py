"""Where report files go: RENDERQUEUE_STORAGE_URL (any fsspec URL) unless configured."""

import dagster as dg

from renderqueue_pipeline.settings import get_settings


class ReportStorage(dg.ConfigurableResource):
    """Root of the report files; empty `url` means RENDERQUEUE_STORAGE_URL."""

    url: str = ""

    def resolved_url(self) -> str:
        return self.url or get_settings().storage


@dg.definitions
def report_resources() -> dg.Definitions:
    return dg.Definitions(resources={"report_storage": ReportStorage()})
