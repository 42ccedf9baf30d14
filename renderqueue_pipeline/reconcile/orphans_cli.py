"""`renderqueue orphans`: requests at fal no item of ours explains (fails while any is)."""

from __future__ import annotations

import click

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.reconcile.adopt import (
    explain_orphan,
    unexplained_orphan_count,
    unexplained_orphans,
)


@click.group("orphans", invoke_without_command=True)
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.pass_context
def orphans(ctx: click.Context, limit: int) -> None:
    """List unexplained requests at fal; exit 1 while there is any (a check for cron/CI)."""
    if ctx.invoked_subcommand is not None:
        return

    with connect() as conn:
        found = unexplained_orphans(conn, limit)
        total = unexplained_orphan_count(conn)
    if not total:
        click.echo("no unexplained requests at fal")
        return
    # one line each, tab-separated: whole request ids, easy to grep and to copy
    click.echo("request_id\tendpoint\tfirst_seen_at\twhy")
    for o in found:
        seen = o["first_seen_at"].isoformat(timespec="seconds")
        click.echo(f"{o['request_id']}\t{o['endpoint']}\t{seen}\t{o['reason']}")
    click.echo(
        f"{total} request(s) at fal that no item explains; once accounted for: "
        "renderqueue orphans explain REQUEST_ID --reason '...'",
        err=True,
    )
    ctx.exit(1)


@orphans.command("explain")
@click.argument("request_id")
@click.option("--reason", required=True, help="Why this request at fal is accounted for.")
def explain(request_id: str, reason: str) -> None:
    """Mark one orphan explained, with the reason (kept with it)."""

    try:
        with connect() as conn:
            found = explain_orphan(conn, request_id, reason)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--reason") from None
    if not found:
        raise click.ClickException(f"no orphan request {request_id!r}")
    click.echo(f"{request_id}: explained")
