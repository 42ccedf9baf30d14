"""Spend truth: fal's own bill, loaded, checked request by request, and prices kept current.

Plain functions over a psycopg connection and a `FalPlatform` client; Dagster
(defs/spend/) and the CLI (`renderqueue spend ...`) are thin layers over them.
"""

from renderqueue_pipeline.spend.billing import (
    BillingLoad,
    day_range,
    load_billing_events,
)
from renderqueue_pipeline.spend.billing_check import (
    BillingCheck,
    apply_billed,
    check_billing,
    summarize,
)
from renderqueue_pipeline.spend.prices import PriceSync, sync_prices
from renderqueue_pipeline.spend.tags import TagComparison, TagTotal, compare_usage_by_tag

__all__ = [
    "BillingCheck",
    "BillingLoad",
    "PriceSync",
    "TagComparison",
    "TagTotal",
    "apply_billed",
    "check_billing",
    "compare_usage_by_tag",
    "day_range",
    "load_billing_events",
    "summarize",
    "sync_prices",
]
