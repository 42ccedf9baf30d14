"""`reconcile_ledger`: one reconcile pass, its figures as run metadata."""

import time
from datetime import timedelta

import dagster as dg
from pydantic import Field

from renderqueue_pipeline.defs.resources import FalConnection, LedgerDatabase
from renderqueue_pipeline.defs.shared import FAL_API_POOL, domain_tags
from renderqueue_pipeline.reconcile import ReconcileOptions, reconcile
from renderqueue_pipeline.settings import Settings

PROGRESS_EVERY_SECONDS = 5.0


class ReconcileConfig(dg.Config):
    """Overrides of RENDERQUEUE_RECONCILE_* for one run (unset: the environment's value)."""

    min_age_minutes: float | None = Field(
        default=None, ge=0, description="Only rows open at least this long (default 10)."
    )
    max_open_hours: float | None = Field(
        default=None, gt=0, description="Rows still open at fal after this become failed (24)."
    )
    concurrency: int | None = Field(
        default=None, ge=1, le=256, description="fal status calls in flight at once (16)."
    )
    max_rows: int | None = Field(
        default=None, ge=1, description="Rows examined per run at most; the rest next run."
    )

    def options(self, settings: Settings) -> ReconcileOptions:
        """The run's settings with this run's overrides."""
        return ReconcileOptions.from_settings(
            settings,
            min_age=None
            if self.min_age_minutes is None
            else timedelta(minutes=self.min_age_minutes),
            max_open=None if self.max_open_hours is None else timedelta(hours=self.max_open_hours),
            concurrency=self.concurrency,
            max_rows=self.max_rows,
        )


@dg.op(pool=FAL_API_POOL)
def reconcile_open_rows(
    context: dg.OpExecutionContext,
    config: ReconcileConfig,
    ledger: LedgerDatabase,
    fal: dg.ResourceParam[FalConnection],
) -> dict:
    """Ask fal about rows whose webhook never came (or came empty) and record its answers."""
    last = [time.monotonic()]
    started = last[0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_SECONDS or done == total:
            last[0] = now
            rate = done / max(now - started, 1e-9)
            eta = (total - done) / rate if rate else 0.0
            context.log.info(f"{done}/{total} rows, {rate:.0f} rows/s, ETA {eta:.0f} s")

    with ledger.connect() as conn:
        # whether fal's request list is read stays the reconciler's choice (`adopt`)
        report = reconcile(
            conn,
            config.options(fal.settings),
            gateway_factory=fal.gateway,
            platform_factory=fal.platform,
            progress=progress,
        )
    figures = report.figures()
    metadata: dict[str, dg.RawMetadataValue] = {
        name: dg.MetadataValue.float(value) if isinstance(value, float) else value
        for name, value in figures.items()
    }
    metadata["summary"] = dg.MetadataValue.md(report.markdown())
    if report.fal_error_samples:
        metadata["fal_error_samples"] = dg.MetadataValue.md(
            "\n".join(f"- {sample}" for sample in report.fal_error_samples)
        )
    if report.adoption.skipped:
        metadata["adoption_skipped"] = report.adoption.skipped
    context.add_output_metadata(metadata)
    return figures


@dg.job(
    tags=domain_tags("reconcile"),
    description="Bring open and payload-less rows to fal's truth (see docs/reconcile.md).",
)
def reconcile_ledger() -> None:
    reconcile_open_rows()
