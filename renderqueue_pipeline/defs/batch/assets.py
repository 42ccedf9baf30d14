"""Where the story starts: the prompts inbox, and the requests fal runs for it.

Neither is materialized here: the data team drops files into the inbox and fal runs what
`submit_batch` sends. Both are declared once so the ledger and everything read from fal
hang off them in the lineage (docs/dagster.md, "Lineage").
"""

import dagster as dg

prompts_inbox = dg.AssetSpec(
    "prompts_inbox",
    group_name="batch",
    kinds={"csv", "parquet"},
    description="Prompts files (CSV, JSONL, Parquet) in RENDERQUEUE_PROMPTS_URL, dropped by "
    "the data team; prompts_inbox_sensor lists them and submit_batch reads each once.",
)

fal_requests = dg.AssetSpec(
    "fal_requests",
    deps=[prompts_inbox],
    group_name="batch",
    kinds={"fal"},
    description="Requests at fal under our key: their status and outputs (webhooks, the "
    "queue API), billing events and usage by tag (the Platform API). Written by fal as it "
    "runs what submit_batch sends.",
)
