"""Our copies of fal's outputs, as one asset: each materialization is one archive run."""

import dagster as dg

from renderqueue_pipeline.archive import run_archive
from renderqueue_pipeline.defs.archive.resources import ArchiveResource
from renderqueue_pipeline.defs.batch.assets import fal_requests
from renderqueue_pipeline.defs.ledger.assets import generations
from renderqueue_pipeline.defs.resources import LedgerDatabase


class ArchiveRunConfig(dg.Config):
    """Launchpad knobs of one archive run."""

    limit: int = 500


@dg.asset(
    deps=[generations, fal_requests],  # completed rows, and fal's copy of each output
    group_name="archive",
    kinds={"postgres", "s3"},
    description="Every completed output copied into RENDERQUEUE_STORAGE_URL before fal's copy "
    "expires (generations/YYYY/MM/<request_id>/<file>), size and sha256 recorded.",
)
def archived_outputs(
    context: dg.AssetExecutionContext,
    config: ArchiveRunConfig,
    ledger: LedgerDatabase,
    archive: ArchiveResource,
) -> dg.MaterializeResult:
    report = run_archive(ledger.connect, archive.setup(limit=config.limit))
    summary = report.as_dict()
    context.log.info(f"archive run: {summary}")
    return dg.MaterializeResult(
        metadata={
            "rows_taken": summary["rows"],
            "archived": summary["archived"],
            "lost": summary["lost"],
            "failed": summary["failed"],
            "retrying": summary["retrying"],
            "already_archived_by_another_run": summary["already_archived_by_another_run"],
            "bytes": summary["bytes"],
            "seconds": dg.MetadataValue.float(summary["seconds"]),
            "mb_per_second": dg.MetadataValue.float(summary["mb_per_second"]),
            "failures_by_reason": dg.MetadataValue.json(summary["failures_by_reason"]),
            **{k: v for k, v in summary.items() if k.startswith("fal_")},
        }
    )
