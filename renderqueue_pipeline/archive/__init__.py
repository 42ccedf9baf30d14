"""The archive: copy every output to our storage before fal's copy expires.

    archive_pending(connect, storage, policy, options)   one run (Dagster and the CLI)
    archive_health(conn)                                 what the checks report
    links(conn, request_id)                              URLs a user opens
    delete_fal_copies(conn, gateway)                     optional: fal's copy, once ours is safe

Plain Python, tested without Dagster; `defs/archive/` is the thin Dagster layer.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable
from typing import Any

import psycopg

from renderqueue_pipeline.archive.core import (
    ArchiveOptions,
    ArchiveReport,
    RowOutcome,
    archive_due_count,
    archive_health,
    archive_pending,
)
from renderqueue_pipeline.archive.delete import delete_fal_copies
from renderqueue_pipeline.archive.fetch import FetchPolicy, parse_hosts, system_resolver
from renderqueue_pipeline.archive.links import links
from renderqueue_pipeline.archive.storage import ArchiveStorage
from renderqueue_pipeline.redact import redact
from renderqueue_pipeline.settings import Settings, get_settings

log = logging.getLogger("renderqueue.archive")

__all__ = [
    "ArchiveOptions",
    "ArchiveReport",
    "ArchiveStorage",
    "FetchPolicy",
    "RowOutcome",
    "archive_due_count",
    "archive_health",
    "archive_pending",
    "delete_fal_copies",
    "links",
    "options_from_settings",
    "policy_from_settings",
    "run_archive",
    "simulator_media_host",
]


def simulator_media_host() -> str | None:
    """host:port of the local fal simulator when fal-client points at it (loopback only)."""
    host = os.environ.get("FAL_QUEUE_RUN_HOST", "")
    name, _, port = host.partition(":")
    if not name or not port:
        return None
    try:
        loopback = ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        loopback = name.lower() == "localhost"
    return host.lower() if loopback else None


def policy_from_settings(settings: Settings | None = None, **overrides: Any) -> FetchPolicy:
    """The fetch policy of RENDERQUEUE_ARCHIVE_HOSTS / _LOOPBACK_HOSTS / _MAX_BYTES /
    _MIN_BYTES_PER_SECOND / _STALL_SECONDS.

    Loopback is allowed only for RENDERQUEUE_ARCHIVE_LOOPBACK_HOSTS entries and for the
    local simulator's own host:port while it is in use.
    """
    settings = settings or get_settings()
    loopback = set(parse_hosts(settings.archive_loopback_hosts))
    simulator = simulator_media_host()
    if simulator:
        loopback.add(simulator)
    values: dict[str, Any] = {
        "allowed_hosts": parse_hosts(settings.archive_hosts),
        "loopback_hosts": frozenset(loopback),
        "max_bytes": settings.archive_max_bytes,
        "min_bytes_per_second": settings.archive_min_rate,
        "stall_seconds": settings.archive_stall_seconds,
        "resolver": system_resolver,
    }
    values.update(overrides)
    return FetchPolicy(**values)


def options_from_settings(settings: Settings | None = None, **overrides: Any) -> ArchiveOptions:
    settings = settings or get_settings()
    values: dict[str, Any] = {
        "limit": settings.archive_batch_rows,
        "concurrency": settings.archive_concurrency,
        "max_attempts": settings.archive_max_attempts,
        "delete_fal_copy": settings.delete_fal_copy,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ArchiveOptions(**values)


def run_archive(
    connect: Callable[[], psycopg.Connection],
    *,
    limit: int | None = None,
    settings: Settings | None = None,
    progress: Callable[[RowOutcome], None] | None = None,
) -> ArchiveReport:
    """One archive run configured from the environment (what Dagster and the CLI call)."""
    settings = settings or get_settings()
    options = options_from_settings(settings, limit=limit)
    report = archive_pending(
        connect,
        ArchiveStorage.from_url(settings.storage),
        policy_from_settings(settings),
        options,
        progress=progress,
    )
    if options.delete_fal_copy:
        try:
            report.fal_delete = delete_fal_copies(
                connect, limit=options.limit, max_attempts=options.max_attempts
            ).as_dict()
        except Exception as exc:  # noqa: BLE001
            # never blocks the archive: recorded, retried next run
            log.warning("deleting fal's copies failed: %s", exc)
            report.fal_delete = {"fal_delete_error": redact(f"{type(exc).__name__}: {exc}")}
    return report
