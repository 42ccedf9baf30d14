"""What an operator watches: nothing lost, the backlog fresh, nothing about to expire."""

import dagster as dg

from renderqueue_pipeline.archive import archive_health
from renderqueue_pipeline.defs.archive.assets import archived_outputs
from renderqueue_pipeline.defs.archive.resources import ArchiveResource
from renderqueue_pipeline.defs.resources import LedgerDatabase


def _health(ledger: LedgerDatabase, archive: ArchiveResource) -> dict:
    with ledger.connect() as conn:
        return archive_health(conn, deadline_hours=archive.deadline_hours)


@dg.asset_check(
    asset=archived_outputs,
    description="Outputs lost (fal's copy expired before ours was made): the target is zero.",
)
def no_outputs_lost(ledger: LedgerDatabase, archive: ArchiveResource) -> dg.AssetCheckResult:
    health = _health(ledger, archive)
    return dg.AssetCheckResult(
        passed=health["lost"] == 0,
        metadata={
            "lost": health["lost"],
            "failed": health["failed"],
            "failures_by_reason": dg.MetadataValue.json(health["failures_by_reason"]),
            "latest_lost": dg.MetadataValue.md(
                "\n".join(
                    f"- `{r['request_id']}`: {r['archive_error']}" for r in health["lost_sample"]
                )
                or "none"
            ),
        },
    )


@dg.asset_check(
    asset=archived_outputs,
    description="The oldest completed-but-unarchived row "
    "is younger than RENDERQUEUE_ARCHIVE_ALERT_MINUTES (default 30).",
)
def archive_backlog_is_fresh(
    ledger: LedgerDatabase, archive: ArchiveResource
) -> dg.AssetCheckResult:
    health = _health(ledger, archive)
    limit_minutes = archive.alert_minutes
    age_minutes = health["oldest_pending_age_seconds"] / 60
    return dg.AssetCheckResult(
        passed=age_minutes <= limit_minutes,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "pending": health["pending"],
            "oldest_pending_age_minutes": dg.MetadataValue.float(round(age_minutes, 2)),
            "alert_after_minutes": dg.MetadataValue.float(limit_minutes),
        },
    )


@dg.asset_check(
    asset=archived_outputs,
    description="No unarchived output is within "
    "RENDERQUEUE_ARCHIVE_DEADLINE_HOURS (default 24) of fal's expiry.",
)
def no_outputs_near_deadline(
    ledger: LedgerDatabase, archive: ArchiveResource
) -> dg.AssetCheckResult:
    health = _health(ledger, archive)
    nearest = health["nearest_deadline"]
    return dg.AssetCheckResult(
        passed=health["near_deadline"] == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "near_deadline": health["near_deadline"],
            "within_hours": dg.MetadataValue.float(archive.deadline_hours),
            "nearest_deadline": nearest.isoformat() if nearest else "none",
        },
    )
