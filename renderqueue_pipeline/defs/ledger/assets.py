"""The ledger in the lineage: one table the batch, the receiver and the reconciler write.

Declared, not materialized: no Dagster asset writes it, yet every report, check and archive
run reads it, so it is the node they all depend on (DAGSTER-STYLE.md section 6).
"""

import dagster as dg

from renderqueue_pipeline.defs.batch.assets import fal_requests, prompts_inbox

generations = dg.AssetSpec(
    "generations",
    # fal_prices: the ledger prices each generation from the `prices` rows (rq_price_for);
    # by key, since the spend assets that define it read this table in turn
    deps=[prompts_inbox, fal_requests, "fal_prices"],
    group_name="ledger",
    kinds={"postgres"},
    description="Postgres table `generations` (with its batches, items and events): one row "
    "per generation and its cost. Written by submit_batch (the rows it sends), the webhook "
    "receiver (fal's results), the reconciler (results whose webhook never came) and "
    "billing_reconciliation (fal's billed figure); docs/ledger.md.",
    metadata={"table": "generations"},
)
