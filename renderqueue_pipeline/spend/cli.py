"""`renderqueue spend ...`: check a month against fal's bill, keep prices current."""

from __future__ import annotations

import datetime as dt

import click

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.db.server import database_url
from renderqueue_pipeline.fal_platform import FalPlatform
from renderqueue_pipeline.money import dollars
from renderqueue_pipeline.months import month_range, parse_month
from renderqueue_pipeline.settings import get_settings
from renderqueue_pipeline.spend import (
    apply_billed,
    check_billing,
    compare_usage_by_tag,
    load_billing_events,
    summarize,
    sync_prices,
)


@click.group()
def spend() -> None:
    """fal's own bill against the ledger (Platform API: FAL_ADMIN_KEY, RENDERQUEUE_FAL_API_URL)."""


@spend.command("reconcile")
@click.option("--month", required=True, help="The month to reconcile, YYYY-MM (UTC).")
@click.option(
    "--load/--no-load",
    default=True,
    show_default=True,
    help="Load the month's billing events from fal first.",
)
@click.option(
    "--apply/--no-apply",
    "apply",
    default=True,
    show_default=True,
    help="Make fal's figure the cost of each billed generation (cost_basis 'billed').",
)
@click.option(
    "--top",
    default=10,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="How many of the largest differences to list.",
)
@click.option(
    "--by-tag",
    is_flag=True,
    help="Also compare our per-user and per-batch totals with fal's usage by tag "
    "(rq_user, rq_batch; needs usage by tag enabled for the account).",
)
def check_bill(month: str, load: bool, apply: bool, top: int, by_tag: bool) -> None:
    """Load fal's billing events for MONTH, classify every request, print the summary."""

    settings = get_settings()
    start, end = month_range(parse_month(month))
    now = dt.datetime.now(dt.UTC)
    url = database_url()
    migrate(url)
    with connect(url) as conn:
        if load:
            with FalPlatform.from_settings(settings) as platform:
                loaded = load_billing_events(
                    conn,
                    platform,
                    start,
                    min(end, now + dt.timedelta(seconds=1)),
                    progress=lambda pages, events: click.echo(
                        f"  page {pages}: {events:,} billing events", err=True
                    ),
                )
            click.echo(
                f"loaded {loaded.events:,} billing events ({loaded.requests:,} requests, "
                f"{dollars(loaded.micros)}) in {loaded.pages} pages"
            )
        check_billing(
            conn, start, end, grace=dt.timedelta(hours=settings.billing_grace_hours), now=now
        )
        if apply:
            changed = apply_billed(conn, start, end)
            click.echo(f"{changed:,} generations now carry fal's figure (cost_basis 'billed')")
        result = summarize(conn, start, end, largest=top)
        tags = None
        if by_tag:
            with FalPlatform.from_settings(settings) as platform:
                tags = compare_usage_by_tag(conn, platform, start, end)
    click.echo(f"\nbilling reconciliation {month} ({result.requests:,} requests)")
    for outcome, total in sorted(result.outcomes.items()):
        click.echo(
            f"  {outcome:<22} {total.requests:>10,}   ours {dollars(total.our_micros):>18}"
            f"   fal {dollars(total.fal_micros):>18}"
        )
    click.echo(f"  our computed total      {dollars(result.our_micros)}")
    click.echo(f"  fal's billed total      {dollars(result.fal_micros)}")
    click.echo(
        f"  difference              {dollars(result.difference_micros)} "
        f"({result.difference_percent:.3f}%; threshold {settings.billing_threshold_percent}%; "
        f"awaiting billing {dollars(result.awaiting_micros)} left out)"
    )
    if result.largest:
        click.echo("\nlargest differences")
        for row in result.largest:
            why = f" ({row['reason']})" if row["reason"] else ""
            click.echo(
                f"  {row['request_id']}  {row['endpoint']}  {row['outcome']}{why}: "
                f"ours {dollars(row['our_micros'] or 0)}, fal {dollars(row['fal_micros'] or 0)}"
            )
    if tags is not None:
        click.echo(
            f"\nfal's usage by tag: {len(tags.totals)} values compared, "
            f"{len(tags.differences)} differ"
        )
        for total in tags.differences[: top or None]:
            row = total.as_row()
            click.echo(
                f"  {row['tag']}: ours {dollars(row['our_micros'])} ({row['our_requests']} "
                f"requests), fal {dollars(row['fal_micros'])} ({row['fal_requests']} requests)"
            )


@spend.command("prices")
def prices() -> None:
    """Read fal's unit prices for the endpoints in use; add a price row for each change."""

    url = database_url()
    migrate(url)
    with connect(url) as conn, FalPlatform.from_settings(get_settings()) as platform:
        result = sync_prices(conn, platform)
    click.echo(f"checked {len(result.checked)} endpoints; unchanged {len(result.unchanged)}")
    for row in result.added_rows:
        click.echo(
            f"  new price {row['endpoint']} {row['resolution'] or '*'} "
            f"audio={row['with_audio']}: {dollars(row['micros_per_second'])}/s "
            f"({row['price_version']})"
        )
    for row in result.unrepresentable:
        click.echo(f"  cannot represent {row['endpoint']}: {row['unit_price']} per {row['unit']}")
    for endpoint in result.not_priced_by_fal:
        click.echo(f"  fal has no price for {endpoint}")
