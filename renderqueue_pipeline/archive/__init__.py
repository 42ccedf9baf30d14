"""The archive: copy every output to our storage before fal's copy expires.

    run_archive(connect, setup, fal_gateway=...)         one run (Dagster and the CLI)
    archive_health(conn)                                 what the checks report
    links(conn, request_id)                              URLs a user opens
    delete_fal_copies(conn, gateway)                     optional: fal's copy, once ours is safe

Plain Python, tested without Dagster; `defs/archive/` is the thin Dagster layer.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.redact import redact
from renderqueue_pipeline.settings import Settings

log = logging.getLogger("renderqueue.archive")

__all__ = [
    "FETCH_POLICY_ENV",
    "ArchiveOptions",
    "ArchiveReport",
    "ArchiveSetup",
    "ArchiveStorage",
    "FetchPolicy",
    "RowOutcome",
    "archive_due_count",
    "archive_health",
    "archive_pending",
    "delete_fal_copies",
    "fetch_policy",
    "links",
    "options_from_settings",
    "policy_from_settings",
    "run_archive",
    "simulator_media_host",
]


def simulator_media_host(queue_run_host: str) -> str | None:
    """host:port of the local fal simulator when fal-client points at it (FAL_QUEUE_RUN_HOST
    `queue_run_host`, loopback only), else None."""
    name, _, port = queue_run_host.partition(":")
    if not name or not port:
        return None
    try:
        loopback = ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        loopback = name.lower() == "localhost"
    return queue_run_host.lower() if loopback else None


#: fetch_policy's arguments and the variable each comes from: the one mapping both
#: `policy_from_settings` (the CLI) and the Dagster resource (defs/archive/resources.py,
#: whose fields carry these names) build the policy through.
FETCH_POLICY_ENV: dict[str, str] = {
    "hosts": "RENDERQUEUE_ARCHIVE_HOSTS",
    "loopback_hosts": "RENDERQUEUE_ARCHIVE_LOOPBACK_HOSTS",
    "queue_run_host": "FAL_QUEUE_RUN_HOST",
    "max_bytes": "RENDERQUEUE_ARCHIVE_MAX_BYTES",
    "min_bytes_per_second": "RENDERQUEUE_ARCHIVE_MIN_BYTES_PER_SECOND",
    "stall_seconds": "RENDERQUEUE_ARCHIVE_STALL_SECONDS",
}


def fetch_policy(
    *,
    hosts: str,
    loopback_hosts: str,
    queue_run_host: str,
    max_bytes: int,
    min_bytes_per_second: float,
    stall_seconds: float,
    **overrides: Any,
) -> FetchPolicy:
    """The fetch policy: hosts and loopback hosts as comma-separated lists.

    Loopback is allowed only for `loopback_hosts` entries and for the local simulator's
    own host:port while fal-client points at it (`queue_run_host`).
    """
    loopback = set(parse_hosts(loopback_hosts))
    simulator = simulator_media_host(queue_run_host)
    if simulator:
        loopback.add(simulator)
    values: dict[str, Any] = {
        "allowed_hosts": parse_hosts(hosts),
        "loopback_hosts": frozenset(loopback),
        "max_bytes": max_bytes,
        "min_bytes_per_second": min_bytes_per_second,
        "stall_seconds": stall_seconds,
        "resolver": system_resolver,
    }
    values.update(overrides)
    return FetchPolicy(**values)


def policy_from_settings(settings: Settings, **overrides: Any) -> FetchPolicy:
    """The fetch policy of the variables in FETCH_POLICY_ENV (RENDERQUEUE_ARCHIVE_HOSTS /
    _LOOPBACK_HOSTS / _MAX_BYTES / _MIN_BYTES_PER_SECOND / _STALL_SECONDS, FAL_QUEUE_RUN_HOST)."""
    values: dict[str, Any] = {
        argument: settings.value_of(variable) for argument, variable in FETCH_POLICY_ENV.items()
    }
    return fetch_policy(**values, **overrides)


def options_from_settings(settings: Settings, **overrides: Any) -> ArchiveOptions:
    """ArchiveOptions of RENDERQUEUE_ARCHIVE_BATCH_ROWS / _CONCURRENCY / _MAX_ATTEMPTS and
    RENDERQUEUE_DELETE_FAL_COPY; `overrides` that are None keep the setting."""
    values: dict[str, Any] = {
        "limit": settings.archive_batch_rows,
        "concurrency": settings.archive_concurrency,
        "max_attempts": settings.archive_max_attempts,
        "delete_fal_copy": settings.delete_fal_copy,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ArchiveOptions(**values)


@dataclass(frozen=True)
class ArchiveSetup:
    """Everything one archive run needs: where to, what may be fetched, how much at once."""

    storage: ArchiveStorage
    policy: FetchPolicy
    options: ArchiveOptions

    @classmethod
    def from_settings(cls, settings: Settings, *, limit: int | None = None) -> ArchiveSetup:
        """The CLI's setup (RENDERQUEUE_STORAGE_URL and the RENDERQUEUE_ARCHIVE_* settings)."""
        return cls(
            ArchiveStorage.from_url(settings.storage),
            policy_from_settings(settings),
            options_from_settings(settings, limit=limit),
        )


def run_archive(
    connect: Callable[[], LedgerConnection],
    setup: ArchiveSetup,
    *,
    progress: Callable[[RowOutcome], None] | None = None,
    fal_gateway: Callable[[], Any] | None = None,
) -> ArchiveReport:
    """One archive run (what Dagster and the CLI call), then fal's copies deleted when
    `setup.options.delete_fal_copy`, through the gateway `fal_gateway()` makes."""
    options = setup.options
    report = archive_pending(connect, setup.storage, setup.policy, options, progress=progress)
    if options.delete_fal_copy:
        try:
            if fal_gateway is None:
                raise ValueError("RENDERQUEUE_DELETE_FAL_COPY is set but no fal gateway was given")
            report.fal_delete = delete_fal_copies(
                connect, fal_gateway, limit=options.limit, max_attempts=options.max_attempts
            ).as_dict()
        except Exception as exc:  # noqa: BLE001
            # never blocks the archive: recorded, retried next run
            log.warning("deleting fal's copies failed: %s", exc)
            report.fal_delete = {"fal_delete_error": redact(f"{type(exc).__name__}: {exc}")}
    return report
