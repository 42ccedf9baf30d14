"""archive_outputs: one archive run (the sensor launches it; the launchpad can too)."""

import dagster as dg

from renderqueue_pipeline.defs.archive.assets import archived_outputs
from renderqueue_pipeline.defs.shared import ARCHIVE_TAG_KEY, domain_tags

#: One archive run at a time: the sensor checks for one in flight, and dagster.yaml's
#: tag_concurrency_limits holds `renderqueue/archive` to 1 as well (dagster_home.py).
ARCHIVE_TAG = {ARCHIVE_TAG_KEY: "run", **domain_tags("archive")}

archive_outputs = dg.define_asset_job(
    "archive_outputs",
    selection=dg.AssetSelection.assets(archived_outputs),
    description="Copy completed outputs into our storage, nearest deadline first, then run "
    "the archive checks.",
    tags=ARCHIVE_TAG,
)
