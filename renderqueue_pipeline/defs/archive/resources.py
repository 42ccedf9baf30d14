"""The archive's resource: where outputs go and how they are fetched."""

from __future__ import annotations

from typing import ClassVar

import dagster as dg

from renderqueue_pipeline.archive import (
    FETCH_POLICY_ENV,
    ArchiveOptions,
    ArchiveSetup,
    ArchiveStorage,
    fetch_policy,
)
from renderqueue_pipeline.defs.env_resource import EnvResource


class ArchiveResource(EnvResource):
    """The archive's settings as explicit values, from the variables in `ENV` (unset: the
    settings' defaults)."""

    #: field -> the environment variable it comes from (docs/archive.md)
    ENV: ClassVar[dict[str, dg.EnvVar]] = {
        "storage_url": dg.EnvVar("RENDERQUEUE_STORAGE_URL"),
        # the fetch policy's fields: the archive's one mapping (hosts ... stall_seconds)
        **{field: dg.EnvVar(variable) for field, variable in FETCH_POLICY_ENV.items()},
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
            fetch_policy(**{field: getattr(self, field) for field in FETCH_POLICY_ENV}),
            ArchiveOptions(
                limit=limit or self.batch_rows,
                concurrency=self.concurrency,
                max_attempts=self.max_attempts,
                delete_fal_copy=self.delete_fal_copy,
            ),
        )
