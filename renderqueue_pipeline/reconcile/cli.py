"""`renderqueue reconcile`: the same pass the `reconcile_every_5m` schedule runs."""

from __future__ import annotations

from datetime import timedelta

import click
from rich.console import Console
from rich.table import Table

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.fal_gateway import FalGateway
from renderqueue_pipeline.fal_platform import FalPlatform
from renderqueue_pipeline.reconcile import ReconcileOptions, reconcile
from renderqueue_pipeline.settings import get_settings


@click.command("reconcile")
@click.option(
    "--min-age-minutes",
    type=click.FloatRange(min=0),
    default=None,
    help="Only rows open at least this long [RENDERQUEUE_RECONCILE_MIN_AGE_MINUTES].",
)
@click.option(
    "--max-open-hours",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Rows still open at fal after this become failed [RENDERQUEUE_RECONCILE_MAX_OPEN_HOURS].",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=None,
    help="fal calls in flight at once [RENDERQUEUE_RECONCILE_CONCURRENCY].",
)
@click.option(
    "--max-rows",
    type=click.IntRange(min=1),
    default=None,
    help="Rows examined at most [RENDERQUEUE_RECONCILE_MAX_ROWS].",
)
def reconcile_command(
    min_age_minutes: float | None,
    max_open_hours: float | None,
    concurrency: int | None,
    max_rows: int | None,
) -> None:
    """Ask fal about rows whose webhook was lost or empty and record its answers."""

    settings = get_settings()
    options = ReconcileOptions.from_settings(
        settings,
        min_age=None if min_age_minutes is None else timedelta(minutes=min_age_minutes),
        max_open=None if max_open_hours is None else timedelta(hours=max_open_hours),
        concurrency=concurrency,
        max_rows=max_rows,
    )
    console = Console(stderr=True)
    with console.status("reconciling...") as spinner, connect() as conn:

        def progress(done: int, total: int) -> None:
            spinner.update(f"reconciling: {done}/{total} rows")

        report = reconcile(
            conn,
            options,
            gateway_factory=lambda n: FalGateway.from_settings(settings, max_concurrency=n),
            platform_factory=lambda: FalPlatform.from_settings(settings),
            progress=progress,
        )
    table = Table("figure", "value", title="reconcile")
    for name, value in report.figures().items():
        table.add_row(name.replace("_", " "), str(value))
    Console().print(table)
    for sample in report.fal_error_samples:
        click.echo(f"fal error: {sample}", err=True)
    if report.adoption.skipped:
        click.echo(f"fal's request list not read: {report.adoption.skipped}", err=True)
