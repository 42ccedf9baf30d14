"""What a batch looks like in the ledger: counts, the first rejections, unknown outcomes.

The same report feeds the Dagster run's metadata and `renderqueue batch show`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from renderqueue_pipeline.db import LedgerConnection, one_row
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.money import usd

TABLE_ROWS = 20
COUNTS = ("read", "submitted", "rejected", "over_budget", "unknown", "pending")


class BatchNotFound(RenderqueueError):
    """No batch has this id."""


@dataclass(frozen=True)
class BatchReport:
    batch_id: int
    source: str
    status: str
    sha256: str | None
    error: str | None
    counts: dict[str, int]
    submitted_estimate_micros: int
    rejections: list[dict[str, Any]] = field(default_factory=list)
    unknown: list[dict[str, Any]] = field(default_factory=list)
    generations: dict[str, int] = field(default_factory=dict)
    created_at: Any = None
    finished_at: Any = None

    def rejections_markdown(self, link_lines: bool = False) -> str:
        """The first rejections as a markdown table (line, field, reason).

        With `link_lines`, each line number links to that line of the source file
        (`<source>#L<line>`), so a reader of the run's metadata opens the row itself.
        """
        if not self.rejections:
            return "no rejected rows"
        lines = ["| line | field | reason |", "|---:|---|---|"]
        for r in self.rejections:
            line = r["line_no"]
            if link_lines and line is not None and self.source:
                line = f"[{line}]({self.source}#L{line})"
            lines.append(f"| {line} | {_md(r['field'])} | {_md(r['reason'])} |")
        more = self.counts["rejected"] + self.counts["over_budget"] - len(self.rejections)
        if more > 0:
            lines.append(f"\n… and {more:,} more (`renderqueue batch show {self.batch_id}`)")
        return "\n".join(lines)

    def unknown_markdown(self) -> str:
        """Items whose outcome is unknown (fal may or may not have them)."""
        if not self.unknown:
            return "none"
        lines = ["| line | user | endpoint | why |", "|---:|---:|---|---|"]
        for r in self.unknown:
            lines.append(
                f"| {r['line_no']} | {r['user_id']} | {_md(r['endpoint'] or '')} | "
                f"{_md(r['reason'] or '')} |"
            )
        more = self.counts["unknown"] - len(self.unknown)
        if more > 0:
            lines.append(f"\n… and {more:,} more")
        return "\n".join(lines)

    def summary(self) -> str:
        c = self.counts
        return (
            f"batch {self.batch_id} ({self.status}): {c['read']:,} read, "
            f"{c['submitted']:,} submitted, {c['rejected']:,} rejected, "
            f"{c['over_budget']:,} over budget, {c['unknown']:,} unknown"
            + (f", {c['pending']:,} pending" if c["pending"] else "")
            + f"; estimated cost of submitted rows {usd(self.submitted_estimate_micros)}"
        )


def _md(text: str) -> str:
    """A table cell: one line, pipes escaped, long reasons cut."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= 300 else flat[:297] + "..."


def batch_report(conn: LedgerConnection, batch_id: int, limit: int = TABLE_ROWS) -> BatchReport:
    """The batch as stored now; BatchNotFound for an unknown id."""
    batch = conn.execute(q("batch_by_id"), {"batch_id": batch_id}).fetchone()
    if batch is None:
        raise BatchNotFound(f"no batch {batch_id} (see `renderqueue batch list`)")
    row = one_row(conn.execute(q("batch_counts"), {"batch_id": batch_id}))
    counts = {name: int(row[name]) for name in COUNTS}
    rejections = conn.execute(
        q("batch_rejections"), {"batch_id": batch_id, "limit": limit}
    ).fetchall()
    unknown = conn.execute(
        q("batch_unknown_items"), {"batch_id": batch_id, "limit": limit}
    ).fetchall()
    generations = {
        r["status"]: int(r["generations"])
        for r in conn.execute(q("batch_generation_states"), {"batch_id": batch_id})
    }
    return BatchReport(
        batch_id=batch_id,
        source=batch["source"],
        status=batch["status"],
        sha256=batch["content_sha256"],
        error=batch["error"],
        counts=counts,
        submitted_estimate_micros=int(row["submitted_estimate_micros"]),
        rejections=[dict(r) for r in rejections],
        unknown=[dict(r) for r in unknown],
        generations=generations,
        created_at=batch["created_at"],
        finished_at=batch["finished_at"],
    )


def recent_batches(conn: LedgerConnection, limit: int = 20) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(q("recent_batches"), {"limit": limit})]
