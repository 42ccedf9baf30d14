"""Every request at fal is named: the check fails while any orphan is unexplained."""

import dagster as dg

from renderqueue_pipeline.defs.reconcile.assets import fal_orphan_requests
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.reconcile.adopt import unexplained_orphans


@dg.asset_check(
    asset=fal_orphan_requests.key,
    description="No request at fal on our endpoints is unexplained: each is adopted by an "
    "item or explained with `renderqueue orphans explain` (fal may bill it).",
)
def fal_orphans_are_explained(ledger: LedgerDatabase) -> dg.AssetCheckResult:
    with ledger.connect() as conn:
        orphans = unexplained_orphans(conn, limit=20)
    return dg.AssetCheckResult(
        passed=not orphans,
        metadata={
            "unexplained": len(orphans),
            "sample": dg.MetadataValue.md(
                "\n".join(
                    f"- `{o['request_id']}` on {o['endpoint']}: {o['reason']}" for o in orphans
                )
                or "none"
            ),
        },
    )
