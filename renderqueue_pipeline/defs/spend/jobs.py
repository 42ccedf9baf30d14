"""Spend jobs: refresh fal's prices; load and reconcile a day of billing; sum up a month."""

from __future__ import annotations

import dagster as dg

from renderqueue_pipeline.defs.shared import domain_tags
from renderqueue_pipeline.defs.spend.assets import (
    billing_reconciliation,
    billing_reconciliation_monthly,
    fal_billing_events,
    fal_prices,
)

refresh_fal_prices = dg.define_asset_job(
    "refresh_fal_prices",
    selection=[fal_prices],
    description="Read fal's unit prices; a changed price becomes a new prices row.",
    tags=domain_tags("spend"),
)

reconcile_billing = dg.define_asset_job(
    "reconcile_billing",
    selection=[fal_billing_events, billing_reconciliation],
    description="Load one UTC day of fal's billing events and classify every request of it.",
    tags=domain_tags("spend"),
)

summarize_billing_month = dg.define_asset_job(
    "summarize_billing_month",
    selection=[billing_reconciliation_monthly],
    description="The month's totals (ours, fal's, difference) and its checks.",
    tags=domain_tags("spend"),
)
