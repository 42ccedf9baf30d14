"""archive_outputs: one archive run (the sensor launches it; the launchpad can too)."""


import dagster as dg

from renderqueue_pipeline.defs.archive.assets import archived_outputs

#: One archive run at a time: the sensor checks for one in flight, and dagster.yaml's
#: tag_concurrency_limits can hold this tag to 1 as well.
ARCHIVE_TAG = {"renderqueue/archive": "run"}

archive_outputs = dg.define_asset_job(
    "archive_outputs",
    selection=dg.AssetSelection.assets(archived_outputs),
    description="Copy completed outputs into our storage, nearest deadline first, then run "
    "the archive checks.",
    tags=ARCHIVE_TAG,
)
