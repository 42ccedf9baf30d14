"""`renderqueue archive` and `renderqueue link`."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape

from renderqueue_pipeline.archive import ArchiveSetup, ArchiveStorage, links, run_archive
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.server import database_url
from renderqueue_pipeline.fal_gateway import FalGateway
from renderqueue_pipeline.redact import redact
from renderqueue_pipeline.settings import get_settings


@click.command("archive")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Rows to take at most (default RENDERQUEUE_ARCHIVE_BATCH_ROWS, 500).",
)
def archive(limit: int | None) -> None:
    """Copy completed outputs into RENDERQUEUE_STORAGE_URL, nearest deadline first."""

    console = Console(stderr=True)
    url = database_url()

    def progress(outcome) -> None:
        detail = f" ({outcome.reason}: {outcome.error})" if outcome.reason else ""
        console.print(
            escape(redact(f"{outcome.status:>8} {outcome.request_id} {outcome.bytes} B{detail}")),
            highlight=False,
            soft_wrap=True,
        )

    settings = get_settings()
    setup = ArchiveSetup.from_settings(settings, limit=limit)
    report = run_archive(
        lambda: connect(url),
        setup,
        progress=progress,
        fal_gateway=lambda: FalGateway.from_settings(settings),
    )
    summary = report.as_dict()
    click.echo(
        f"archived {summary['archived']}, lost {summary['lost']}, failed {summary['failed']}, "
        f"retrying {summary['retrying']}; {summary['bytes']} bytes in {summary['seconds']} s "
        f"({summary['mb_per_second']} MB/s)"
    )
    for reason, count in sorted(summary["failures_by_reason"].items()):
        click.echo(f"  {reason}: {count}")


@click.command("link")
@click.argument("request_id")
@click.option(
    "--expires",
    type=click.IntRange(min=1, max=7 * 24 * 3600),
    default=3600,
    show_default=True,
    help="Lifetime of a presigned S3 URL, in seconds.",
)
def link(request_id: str, expires: int) -> None:
    """Print a link to our copy of REQUEST_ID's output (one line per file)."""

    storage = ArchiveStorage.from_url(get_settings().storage)
    with connect() as conn:
        for line in links(conn, request_id, storage, expires_seconds=expires):
            click.echo(line)
