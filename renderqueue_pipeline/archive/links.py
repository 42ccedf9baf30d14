"""Links to our copies: a presigned URL for s3://, a local path for file://."""

from __future__ import annotations

from renderqueue_pipeline.archive.storage import ArchiveStorage
from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.errors import RenderqueueError


class NotArchived(RenderqueueError):
    """The generation has no archived copy (yet, or ever); the message says which."""


def links(
    conn: LedgerConnection,
    request_id: str,
    storage: ArchiveStorage,
    *,
    expires_seconds: int = 3600,
) -> list[str]:
    """One link per archived file of the generation, main file first.

    Raises NotArchived (unknown request, not archived yet, lost, failed) with the reason.
    """
    rows = conn.execute(q("archive_links"), {"request_id": request_id}).fetchall()
    if not rows:
        raise NotArchived(f"request {request_id}: no such generation")
    status = rows[0]["archive_status"]
    if status != "archived" or rows[0]["archive_url"] is None:
        why = f": {rows[0]['archive_error']}" if rows[0]["archive_error"] else ""
        raise NotArchived(f"request {request_id}: not archived (archive_status={status}){why}")
    return [storage.link(row["archive_url"], expires_seconds) for row in rows]
