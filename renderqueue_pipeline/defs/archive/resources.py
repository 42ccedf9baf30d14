"""The archive's resource: where outputs go and how they are fetched."""

from __future__ import annotations

from typing import ClassVar

import dagster as dg

from renderqueue_pipeline.archive import ArchiveOptions, ArchiveSetup, ArchiveStorage, fetch_policy
from renderqueue_pipeline.defs.resources import EnvResource


class ArchiveResource(EnvResource):
    """The archive's settings as explicit values, from the variables in `ENV` (unset: the
    settings' defaults)."""

    #: field -> the environment variable it comes from (docs/archive.md)
    ENV: ClassVar[dict[str, dg.EnvVar]] = {
        "storage_url": dg.EnvVar("RENDERQUEUE_STORAGE_URL"),
        "hosts": dg.EnvVar("RENDERQUEUE_ARCHIVE_HOSTS"),
        "loopback_hosts": dg.EnvVar("RENDERQUEUE_ARCHIVE_LOOPBACK_HOSTS"),
        "queue_run_host": dg.EnvVar("FAL_QUEUE_RUN_HOST"),
        "max_bytes": dg.EnvVar("RENDERQUEUE_ARCHIVE_MAX_BYTES"),
        "min_bytes_per_second": dg.EnvVar("RENDERQUEUE_ARCHIVE_MIN_BYTES_PER_SECOND"),
        "stall_seconds": dg.EnvVar("RENDERQUEUE_ARCHIVE_STALL_SECONDS"),
        "batch_rows": dg.EnvVar("RENDERQUEUE_ARCHIVE_BATCH_ROWS"),
        "concurrency": dg.EnvVar("RENDERQUEUE_ARCHIVE_CONCURRENCY"),
        "max_attempts": dg.EnvVar("RENDERQUEUE_ARCHIVE_MAX_ATTEMPTS"),
        "delete_fal_copy": dg.EnvVar("RENDERQUEUE_DELETE_FAL_COPY"),
        "alert_minutes": dg.EnvVar("RENDERQUEUE_ARCHIVE_ALERT_MINUTES"),
        "deadline_hours": dg.EnvVar("RENDERQUEUE_ARCHIVE_DEADLINE_HOURS"),
    }

    storage_url: str
    hosts: str
    loopback_hosts: str
    queue_run_host: str
    max_bytes: int
    min_bytes_per_second: float
    stall_seconds: float
    batch_rows: int
    concurrency: int
    max_attempts: int
    delete_fal_copy: bool
    alert_minutes: float
    deadline_hours: float

    def setup(self, limit: int | None = None) -> ArchiveSetup:
        """One run's setup; `limit` rows at most (default `batch_rows`)."""
        return ArchiveSetup(
            ArchiveStorage.from_url(self.storage_url),
            fetch_policy(
                hosts=self.hosts,
                loopback_hosts=self.loopback_hosts,
                queue_run_host=self.queue_run_host,
                max_bytes=self.max_bytes,
                min_bytes_per_second=self.min_bytes_per_second,
                stall_seconds=self.stall_seconds,
            ),
            ArchiveOptions(
                limit=limit or self.batch_rows,
                concurrency=self.concurrency,
                max_attempts=self.max_attempts,
                delete_fal_copy=self.delete_fal_copy,
            ),
        )
