"""Tables the reconciler writes, in the lineage: fal's requests no item of ours explains."""

import dagster as dg

fal_orphan_requests = dg.AssetSpec(
    "fal_orphan_requests",
    group_name="reconcile",
    kinds={"postgres"},
    description=(
        "Postgres table `fal_orphan_requests`: requests fal has on our endpoints whose tags "
        "name no item of this ledger; written by the reconciler (docs/reconcile.md)."
    ),
    metadata={"table": "fal_orphan_requests"},
)
