"""Archive every output before fal's copy expires: claim due rows, copy, record.

`archive_pending` is what the Dagster run and `renderqueue archive` call. It takes rows
nearest their deadline first, in small leased chunks (a concurrent run skips leased
rows), copies every media file of a row with bounded memory and bounded concurrency,
and records the result: all files or none, size and sha256, failures with their reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
import psycopg

from renderqueue_pipeline.archive.fetch import (
    FetchError,
    FetchPolicy,
    Gone,
    LengthMismatch,
    download_deadline,
    make_client,
    open_download,
)
from renderqueue_pipeline.archive.mp4 import Mp4Duration, is_video
from renderqueue_pipeline.archive.storage import ArchiveStorage, Upload, safe_file_name
from renderqueue_pipeline.db import LedgerConnection, one_row
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.redact import redact

log = logging.getLogger("renderqueue.archive")


@dataclass(frozen=True)
class ArchiveOptions:
    """How a run behaves (defaults match the settings' defaults)."""

    limit: int = 500
    concurrency: int = 4
    max_attempts: int = 5
    backoff_seconds: float = 60.0
    max_backoff_seconds: float = 3600.0
    min_backoff_seconds: float = 10.0
    lease_seconds: float = 1800.0
    delete_fal_copy: bool = False


@dataclass
class ArchivedFile:
    ordinal: int
    source_url: str
    file_name: str
    content_type: str | None
    bytes: int
    sha256: str
    archive_url: str
    measured: bool = False  # a video whose header was read for its length
    seconds: Decimal | None = None  # the length its header states
    seconds_problem: str | None = None  # why it could not be read


@dataclass
class RowOutcome:
    """What happened to one row in this run."""

    request_id: str
    status: str  # archived | lost | failed | retry | skipped
    reason: str | None = None
    error: str | None = None
    bytes: int = 0
    files: list[ArchivedFile] = field(default_factory=list)
    #: what the measured length did to the ledger (rq_apply_measured_seconds), if measured
    priced: str | None = None


@dataclass
class ArchiveReport:
    """A run's summary: what run metadata and the CLI show."""

    archived: int = 0
    lost: int = 0
    failed: int = 0
    retrying: int = 0
    already_done: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures_by_reason: Counter = field(default_factory=Counter)
    outcomes: list[RowOutcome] = field(default_factory=list)
    fal_delete: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.archived + self.lost + self.failed + self.retrying + self.already_done

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "archived": self.archived,
            "lost": self.lost,
            "failed": self.failed,
            "retrying": self.retrying,
            "already_archived_by_another_run": self.already_done,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "mb_per_second": round(self.mb_per_second, 2),
            "failures_by_reason": dict(self.failures_by_reason),
            **self.fal_delete,
        }


# ----- one row -----------------------------------------------------------------------------------


def _stored_names(files: list[dict[str, Any]], url_name: Callable[[str], str]) -> list[str]:
    """One safe, distinct name per file; clashing names get their ordinal in front."""
    names = [
        safe_file_name(f.get("file_name") or url_name(f["url"]), f"file-{f['ordinal']}")
        for f in files
    ]
    clashes = {n for n in names if names.count(n) > 1}
    return [f"{f['ordinal']}-{n}" if n in clashes else n for f, n in zip(files, names, strict=True)]


def _name_from_url(url: str) -> str:
    return httpx.URL(url).path.rsplit("/", 1)[-1]


def copy_file(
    client: httpx.Client,
    policy: FetchPolicy,
    storage: ArchiveStorage,
    url: str,
    request_id: str,
    final: str,
    expected_size: int | None,
    measure: Mp4Duration | None = None,
) -> tuple[int, str, Upload]:
    """Stream one URL into an upload nobody sees yet; (bytes, sha256, upload) once checked.

    `measure`, if given, sees every byte as it streams past (a video's length from its
    header: no second read of the file).

    A Content-Length or fal file_size that disagrees with the bytes received is a
    LengthMismatch; any failure aborts the upload. The download must finish within the
    policy's deadline for its size (fal's file_size, then the Content-Length): TooSlow.
    """
    with (
        download_deadline(policy.download_seconds(expected_size)) as tighten,
        contextlib.ExitStack() as stack,
    ):
        download = open_download(client, url, policy, stack)
        if download.content_length is not None:
            tighten(policy.download_seconds(download.content_length))
        if (
            download.content_length is not None
            and expected_size is not None
            and download.content_length != expected_size
        ):
            raise LengthMismatch(
                f"{url}: Content-Length {download.content_length} but fal's "
                f"file_size is {expected_size}"
            )
        digest = hashlib.sha256()
        received = 0
        upload = storage.begin(request_id, final)
        try:
            for chunk in download.chunks:
                digest.update(chunk)
                if measure is not None and not measure.done:
                    measure.feed(chunk)
                upload.write(chunk)
                received += len(chunk)
            for announced, what in (
                (download.content_length, "Content-Length"),
                (expected_size, "fal's file_size"),
            ):
                if announced is not None and received != announced:
                    raise LengthMismatch(
                        f"{url}: received {received} bytes, {what} says {announced}"
                    )
            upload.seal(received)
        except BaseException:
            upload.abort()
            raise
    return received, digest.hexdigest(), upload


def copy_row(
    row: dict[str, Any], client: httpx.Client, policy: FetchPolicy, storage: ArchiveStorage
) -> RowOutcome:
    """Copy every media file of one generation: all of them become visible, or none."""
    request_id = row["request_id"]
    files = row["files"]
    if not files:
        return RowOutcome(request_id, "failed", "no_media", "the output has no media files")
    names = _stored_names(files, _name_from_url)
    uploads: list[Upload] = []
    committed: list[Upload] = []
    archived: list[ArchivedFile] = []
    try:
        for file, name in zip(files, names, strict=True):
            final = storage.final_path(row["created_at"], request_id, name)
            measure = Mp4Duration() if is_video(file.get("content_type"), name) else None
            size, sha, upload = copy_file(
                client,
                policy,
                storage,
                file["url"],
                request_id,
                final,
                file.get("file_size"),
                measure,
            )
            uploads.append(upload)
            seconds = measure.finish() if measure is not None else None
            archived.append(
                ArchivedFile(
                    file["ordinal"],
                    file["url"],
                    name,
                    file.get("content_type"),
                    size,
                    sha,
                    storage.url_of(final),
                    measure is not None,
                    seconds,
                    measure.problem if measure is not None else None,
                )
            )
        for upload in uploads:
            upload.commit()
            committed.append(upload)
    except Exception as exc:
        for upload in uploads:
            if upload in committed:
                storage.discard(upload.final)  # all or nothing: take back the ones shown
            else:
                upload.abort()
        if isinstance(exc, FetchError):
            status = "lost" if isinstance(exc, Gone) else "failed"
            return RowOutcome(request_id, status, exc.reason, str(exc))
        log.warning("archive of %s failed: %s", request_id, exc, exc_info=True)
        return RowOutcome(request_id, "failed", "storage", f"{type(exc).__name__}: {exc}")
    return RowOutcome(request_id, "archived", bytes=sum(a.bytes for a in archived), files=archived)


# ----- recording ---------------------------------------------------------------------------------

#: Reasons no retry can fix: the row fails at once (lost rows are separate: `gone`).
PERMANENT_REASONS = frozenset(
    {"host_not_allowed", "address_refused", "too_large", "bad_url", "no_media"}
)


def record_outcome(
    conn: LedgerConnection, row: dict[str, Any], outcome: RowOutcome, options: ArchiveOptions
) -> RowOutcome:
    """Write one row's outcome in one transaction; the row's final status comes back."""
    with conn.transaction():
        if outcome.status == "archived":
            main = outcome.files[0]
            done = conn.execute(
                q("archive_record_success"),
                {
                    "id": row["id"],
                    "archive_url": main.archive_url,
                    "bytes": outcome.bytes,
                    "sha256": main.sha256 if len(outcome.files) == 1 else _combined(outcome.files),
                    "delete_fal_copy": options.delete_fal_copy,
                },
            ).fetchone()
            if done is None:
                outcome.status = "skipped"
                return outcome
            for f in outcome.files:
                conn.execute(
                    q("archive_record_file"),
                    {
                        "generation_id": row["id"],
                        "ordinal": f.ordinal,
                        "source_url": f.source_url,
                        "file_name": f.file_name,
                        "content_type": f.content_type,
                        "bytes": f.bytes,
                        "sha256": f.sha256,
                        "archive_url": f.archive_url,
                    },
                )
            if main.measured:  # the clip's length from its own header prices the row
                outcome.priced = _apply_measured_seconds(conn, row, main)
            return outcome
        result = conn.execute(
            q("archive_record_failure"),
            {
                "id": row["id"],
                "error": redact(outcome.error or "")[:2000],
                "reason": outcome.reason,
                "lost": outcome.status == "lost",
                "permanent": outcome.reason in PERMANENT_REASONS,
                "max_attempts": options.max_attempts,
                "backoff_seconds": options.backoff_seconds,
                "max_backoff_seconds": options.max_backoff_seconds,
                "min_backoff_seconds": options.min_backoff_seconds,
            },
        ).fetchone()
    if result is None:
        outcome.status = "skipped"
    elif result["archive_status"] == "pending":
        outcome.status = "retry"
    else:
        outcome.status = result["archive_status"]
    return outcome


def _apply_measured_seconds(
    conn: LedgerConnection, row: dict[str, Any], main: ArchivedFile
) -> str | None:
    """Price the row from its clip's measured length; a failure here never undoes the copy."""
    try:
        with conn.transaction():  # a savepoint inside the record's transaction
            return one_row(
                conn.execute(
                    q("archive_apply_measured_seconds"),
                    {"id": row["id"], "seconds": main.seconds, "problem": main.seconds_problem},
                )
            )["applied"]
    except psycopg.Error as exc:
        log.warning("pricing %s from its measured length failed: %s", row["request_id"], exc)
        return "error"


def _combined(files: list[ArchivedFile]) -> str:
    """One checksum for a several-file output: sha256 over the files' `ordinal:sha256` lines."""
    text = "".join(f"{f.ordinal}:{f.sha256}\n" for f in files)
    return hashlib.sha256(text.encode()).hexdigest()


# ----- the run -----------------------------------------------------------------------------------


def archive_pending(
    connect: Callable[[], LedgerConnection],
    storage: ArchiveStorage,
    policy: FetchPolicy,
    options: ArchiveOptions = ArchiveOptions(),
    *,
    progress: Callable[[RowOutcome], None] | None = None,
) -> ArchiveReport:
    """Archive up to `options.limit` due rows; return what happened.

    Rows are claimed a few at a time (nearest deadline first) as copy slots free up, so a
    long run keeps following the deadlines and a crashed run's leases expire on their own.
    """
    report = ArchiveReport()
    started = time.monotonic()
    claimed = 0
    # a copy still running when its row's lease ends could be taken by another run
    longest = max(1.0, options.lease_seconds - 60.0)
    if policy.max_download_seconds > longest:
        policy = dataclasses.replace(policy, max_download_seconds=longest)
    with (
        connect() as conn,
        make_client(policy, concurrency=options.concurrency) as client,
        ThreadPoolExecutor(options.concurrency, thread_name_prefix="archive") as pool,
    ):
        running: dict[Future, dict[str, Any]] = {}
        exhausted = False
        while True:
            room = options.concurrency * 2 - len(running)
            if not exhausted and room > 0 and claimed < options.limit:
                with conn.transaction():
                    rows = conn.execute(
                        q("archive_claim"),
                        {
                            "limit": min(room, options.limit - claimed),
                            "lease_seconds": options.lease_seconds,
                        },
                    ).fetchall()
                rows.sort(
                    key=lambda r: (
                        r["fal_expires_at"] is None,
                        r["fal_expires_at"],
                        r["finished_at"],
                    )
                )
                claimed += len(rows)
                exhausted = not rows
                for row in rows:
                    running[pool.submit(copy_row, row, client, policy, storage)] = row
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                row = running.pop(future)
                outcome = record_outcome(conn, row, future.result(), options)
                _count(report, outcome)
                if progress is not None:
                    progress(outcome)
    report.seconds = time.monotonic() - started
    return report


def _count(report: ArchiveReport, outcome: RowOutcome) -> None:
    report.outcomes.append(outcome)
    if outcome.status == "archived":
        report.archived += 1
        report.bytes += outcome.bytes
        return
    if outcome.status == "skipped":
        report.already_done += 1
        return
    if outcome.status == "lost":
        report.lost += 1
    elif outcome.status == "failed":
        report.failed += 1
    else:
        report.retrying += 1
    report.failures_by_reason[outcome.reason or "unknown"] += 1


def archive_due_count(conn: LedgerConnection, *, cap: int = 500) -> int:
    """How many rows a run would take now, counting at most `cap` (cheap, for the sensor)."""
    return int(one_row(conn.execute(q("archive_due_count"), {"cap": cap}))["due"])


def archive_health(conn: LedgerConnection, *, deadline_hours: float = 24.0) -> dict[str, Any]:
    """Lost outputs, failures by reason, the backlog's oldest row, rows near their deadline."""
    health = dict(one_row(conn.execute(q("archive_health"), {"deadline_hours": deadline_hours})))
    oldest = health["oldest_pending_finished_at"]
    health["oldest_pending_age_seconds"] = (
        (health["checked_at"] - oldest).total_seconds() if oldest is not None else 0.0
    )
    health["failures_by_reason"] = {
        f"{r['archive_status']}:{r['reason']}": r["rows"]
        for r in conn.execute(q("archive_failures_by_reason")).fetchall()
    }
    health["lost_sample"] = [
        dict(r) for r in conn.execute(q("archive_lost_sample"), {"limit": 10}).fetchall()
    ]
    return health


def isoformat(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
