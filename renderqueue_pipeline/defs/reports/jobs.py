"""One job for a month's spend report: the tables, their checks, then the files."""

import dagster as dg

from renderqueue_pipeline.defs.shared import domain_tags

spend_report = dg.define_asset_job(
    "spend_report",
    selection=dg.AssetSelection.groups("reports"),
    description="Refresh (or finalize) one month of spend reports, check them, write the files.",
    tags=domain_tags("reports"),
)
