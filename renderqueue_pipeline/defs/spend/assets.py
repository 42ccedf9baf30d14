"""Spend assets: fal's prices, fal's billing events (daily), and the reconciliation of the
ledger with them (daily, plus a monthly summary with its checks)."""

import datetime as dt

import dagster as dg

from renderqueue_pipeline.defs.batch.assets import fal_requests
from renderqueue_pipeline.defs.freshness.policies import daily_billing_policy
from renderqueue_pipeline.defs.ledger.assets import generations
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.defs.shared import FAL_API_POOL, daily_partitions, monthly_partitions
from renderqueue_pipeline.defs.spend.resources import BillingCheckResource, FalPlatformResource
from renderqueue_pipeline.fal_platform import FalPlatformAuthError, FalPlatformError
from renderqueue_pipeline.money import dollars
from renderqueue_pipeline.months import month_range, parse_month
from renderqueue_pipeline.spend import (
    apply_billed,
    check_billing,
    compare_usage_by_tag,
    day_range,
    load_billing_events,
    summarize,
    sync_prices,
)
from renderqueue_pipeline.spend.tags import TagComparison


class ReconcileConfig(dg.Config):
    """Empty values mean the `billing_check` resource's (RENDERQUEUE_BILLING_GRACE_HOURS)."""

    grace_hours: float | None = None
    apply_billed: bool = True


class MonthlyCheckConfig(dg.Config):
    threshold_percent: float | None = None


@dg.asset(
    group_name="spend",
    kinds={"postgres"},
    pool=FAL_API_POOL,
    check_specs=[dg.AssetCheckSpec("fal_price_units_are_representable", asset="fal_prices")],
)
def fal_prices(ledger: LedgerDatabase, fal_platform: FalPlatformResource) -> dg.MaterializeResult:
    """fal's unit prices for the endpoints in use; a change becomes a new `prices` row."""
    with ledger.connect() as conn, fal_platform.client() as platform:
        result = sync_prices(conn, platform)
    return dg.MaterializeResult(
        metadata={
            "endpoints_checked": len(result.checked),
            "endpoints_changed": dg.MetadataValue.json(result.changed),
            "price_rows_added": len(result.added_rows),
            "not_priced_by_fal": dg.MetadataValue.json(result.not_priced_by_fal),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="fal_price_units_are_representable",
                passed=not result.unrepresentable,
                metadata={"unrepresentable": dg.MetadataValue.json(result.unrepresentable)},
            )
        ],
    )


@dg.asset(
    group_name="spend",
    kinds={"postgres"},
    pool=FAL_API_POOL,
    deps=[fal_requests],  # fal's billing events for our requests
    partitions_def=daily_partitions,
    freshness_policy=daily_billing_policy,
)
def fal_billing_events(
    context: dg.AssetExecutionContext, ledger: LedgerDatabase, fal_platform: FalPlatformResource
) -> dg.MaterializeResult:
    """One UTC day of fal's billing events, replacing the day in one transaction."""
    start, end = day_range(dt.date.fromisoformat(context.partition_key))
    with ledger.connect() as conn, fal_platform.client() as platform:
        loaded = load_billing_events(conn, platform, start, end)
    return dg.MaterializeResult(
        metadata={
            "dagster/partition_row_count": loaded.events,
            "requests": loaded.requests,
            "pages": loaded.pages,
            "fal_billed": dollars(loaded.micros),
            "fal_billed_micros": loaded.micros,
        }
    )


@dg.asset(
    group_name="spend",
    kinds={"postgres"},
    partitions_def=daily_partitions,
    deps=[fal_billing_events, generations],  # classifies, then writes billed figures back
    freshness_policy=daily_billing_policy,
)
def billing_reconciliation(
    context: dg.AssetExecutionContext,
    config: ReconcileConfig,
    ledger: LedgerDatabase,
    billing_check: BillingCheckResource,
) -> dg.MaterializeResult:
    """Every request of the day classified against fal's bill; billed figures applied."""
    start, end = day_range(dt.date.fromisoformat(context.partition_key))
    grace = config.grace_hours
    if grace is None:
        grace = billing_check.grace_hours
    with ledger.connect() as conn:
        result = check_billing(conn, start, end, grace=dt.timedelta(hours=grace))
        applied = apply_billed(conn, start, end) if config.apply_billed else 0
    return dg.MaterializeResult(
        metadata={
            "dagster/partition_row_count": result.requests,
            **result.as_metadata(),
            "generations_billed_now": applied,
        }
    )


@dg.asset(
    group_name="spend",
    kinds={"postgres"},
    partitions_def=monthly_partitions,
    # the days' findings; our totals by tag beside fal's usage by tag
    deps=[billing_reconciliation, generations, fal_requests],
    check_specs=[
        dg.AssetCheckSpec(
            "monthly_billing_difference_under_threshold", asset="billing_reconciliation_monthly"
        ),
        dg.AssetCheckSpec(
            "no_billed_request_unknown_to_ledger", asset="billing_reconciliation_monthly"
        ),
        dg.AssetCheckSpec(
            "fal_usage_by_tag_matches_ledger", asset="billing_reconciliation_monthly"
        ),
    ],
)
def billing_reconciliation_monthly(
    context: dg.AssetExecutionContext,
    config: MonthlyCheckConfig,
    ledger: LedgerDatabase,
    fal_platform: FalPlatformResource,
    billing_check: BillingCheckResource,
) -> dg.MaterializeResult:
    """The month: our computed total, fal's billed total, the difference, the top findings,
    and our per-user and per-batch totals beside fal's usage by tag (rq_user, rq_batch)."""
    start, end = month_range(parse_month(context.partition_key))
    threshold = (
        config.threshold_percent
        if config.threshold_percent is not None
        else billing_check.threshold_percent
    )
    with ledger.connect() as conn, fal_platform.client() as platform:
        result = summarize(conn, start, end, largest=10)
        try:
            by_tag = compare_usage_by_tag(conn, platform, start, end)
            tag_error = ""
        except FalPlatformAuthError:
            raise
        except FalPlatformError as exc:  # e.g. usage by tag not enabled for the account
            by_tag, tag_error = TagComparison(start, end), str(exc)
    tag_table = "\n".join(
        f"| {r['tag']} | {r['our_requests']} | {dollars(r['our_micros'])} | "
        f"{r['fal_requests']} | {dollars(r['fal_micros'])} | {r['difference_micros']} |"
        for r in (t.as_row() for t in by_tag.differences[:20])
    )
    table = "\n".join(
        f"| {r['request_id']} | {r['endpoint']} | {r['outcome']} | {r['reason'] or ''} | "
        f"{dollars(r['our_micros'] or 0)} | {dollars(r['fal_micros'] or 0)} |"
        for r in result.largest
    )
    unknown = result.count("unknown_to_ledger")
    return dg.MaterializeResult(
        metadata={
            **result.as_metadata(),
            "our_computed_total": dollars(result.our_micros),
            "fal_billed_total": dollars(result.fal_micros),
            "difference": dollars(result.difference_micros),
            "largest_differences": dg.MetadataValue.md(
                "| request | endpoint | outcome | why | ours | fal |\n|---|---|---|---|---|---|\n"
                + table
            ),
            **by_tag.as_metadata(),
            "usage_by_tag_differences": dg.MetadataValue.md(
                "| tag | our requests | ours | fal requests | fal | fal - ours (micro-$) |\n"
                "|---|---|---|---|---|---|\n" + tag_table
            ),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="monthly_billing_difference_under_threshold",
                passed=result.difference_percent <= threshold,
                metadata={
                    "difference_percent": round(result.difference_percent, 4),
                    "threshold_percent": threshold,
                    "difference_micros": result.difference_micros,
                },
            ),
            dg.AssetCheckResult(
                check_name="no_billed_request_unknown_to_ledger",
                passed=unknown == 0,
                metadata={"unknown_to_ledger": unknown},
            ),
            dg.AssetCheckResult(
                check_name="fal_usage_by_tag_matches_ledger",
                passed=not by_tag.differences and not tag_error,
                metadata={
                    **by_tag.as_metadata(),
                    "fal_usage_by_tag_error": tag_error,
                    "differing": dg.MetadataValue.json(
                        [t.as_row() for t in by_tag.differences[:50]]
                    ),
                },
            ),
        ],
    )
