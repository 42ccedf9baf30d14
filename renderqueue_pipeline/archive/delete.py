"""Deleting fal's copy once ours is safe (RENDERQUEUE_DELETE_FAL_COPY=1, off by default).

Only rows whose archive was recorded (`archive_status = 'archived'`) are ever asked
about: `archive_record_success` marks them `fal_delete_status = 'pending'`. fal's answer
per file is stored on the file's `generation_files` row; a failed deletion is retried
with backoff and never touches the archive.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.redact import redact


class DeletedFileAnswer(Protocol):
    @property
    def link(self) -> str: ...
    @property
    def error(self) -> str | None: ...


class DeleteIOGateway(Protocol):
    async def delete_io(self, request_id: str) -> Sequence[DeletedFileAnswer]: ...


@dataclass
class DeleteReport:
    deleted: int = 0
    retrying: int = 0
    failed: int = 0
    errors: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "fal_copies_deleted": self.deleted,
            "fal_deletes_retrying": self.retrying,
            "fal_deletes_failed": self.failed,
        }


async def adelete_fal_copies(
    connect: Callable[[], LedgerConnection],
    gateway: DeleteIOGateway,
    *,
    limit: int = 500,
    max_attempts: int = 5,
    backoff_seconds: float = 300.0,
    max_backoff_seconds: float = 6 * 3600.0,
) -> DeleteReport:
    """Ask fal to delete the payloads and output files of archived rows still pending."""
    report = DeleteReport()
    with connect() as conn:
        with conn.transaction():
            rows = conn.execute(
                q("fal_delete_claim"), {"limit": limit, "lease_seconds": 600}
            ).fetchall()
        for row in rows:
            error: str | None = None
            try:
                answers = await gateway.delete_io(row["request_id"])
            except Exception as exc:  # noqa: BLE001
                error = redact(f"{type(exc).__name__}: {exc}")
                answers = []
            with conn.transaction():
                for answer in answers:
                    conn.execute(
                        q("fal_delete_record_answer"),
                        {
                            "generation_id": row["id"],
                            "link": answer.link,
                            "answer": "deleted" if answer.error is None else answer.error[:2000],
                        },
                    )
                refused = [a for a in answers if a.error is not None]
                if error is None and refused:
                    error = "; ".join(f"{a.link}: {a.error}" for a in refused)[:2000]
                if error is None:
                    conn.execute(q("fal_delete_record_done"), {"id": row["id"]})
                    report.deleted += 1
                    continue
                conn.execute(
                    q("fal_delete_record_failure"),
                    {
                        "id": row["id"],
                        "error": error,
                        "max_attempts": max_attempts,
                        "backoff_seconds": backoff_seconds,
                        "max_backoff_seconds": max_backoff_seconds,
                    },
                )
            final = row["fal_delete_attempts"] + 1 >= max_attempts
            report.failed += final
            report.retrying += not final
            report.errors[error.split(":", 1)[0]] += 1
    return report


def delete_fal_copies(
    connect: Callable[[], LedgerConnection], fal_gateway: Callable[[], Any], **options: Any
) -> DeleteReport:
    """adelete_fal_copies with the gateway `fal_gateway()` makes (the caller's settings)."""

    async def run() -> DeleteReport:
        async with fal_gateway() as gateway:
            return await adelete_fal_copies(connect, gateway, **options)

    return asyncio.run(run())
