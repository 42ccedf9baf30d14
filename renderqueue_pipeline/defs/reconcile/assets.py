"""Tables the reconciler writes, in the lineage: fal's requests no item of ours explains."""

import dagster as dg

from renderqueue_pipeline.defs.batch.assets import fal_requests
from renderqueue_pipeline.defs.ledger.assets import generations

fal_orphan_requests = dg.AssetSpec(
    "fal_orphan_requests",
    deps=[fal_requests, generations],  # fal's request list against the ledger's items
    group_name="reconcile",
    kinds={"postgres"},
    description=(
        "Postgres table `fal_orphan_requests`: requests fal has on our endpoints whose tags "
        "name no item of this ledger; written by the reconciler (docs/reconcile.md)."
    ),
    metadata={"table": "fal_orphan_requests"},
)
