"""Our per-user and per-batch totals beside fal's usage by tag (X-Fal-Tags rq_user, rq_batch).

Every request we send carries `rq_user` and, from a batch, `rq_batch`
(`fal_gateway.RequestIdentity`). fal's usage API groups the cost of what it billed by a
tag's value; the ledger groups its completed generations by user and by batch. A value
whose totals differ is a request fal billed to one user or batch that the ledger puts
elsewhere (or nowhere), or a cost that differs: either way, something to look at.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.fal_platform import FalPlatform

#: the tags compared, and what the ledger groups by for each
TAG_KEYS = {"rq_user": "user", "rq_batch": "batch"}


@dataclass(frozen=True)
class TagTotal:
    """One tag value: the ledger's requests and micro-dollars beside fal's."""

    tag_key: str
    tag_value: str | None
    our_requests: int
    our_micros: int
    fal_requests: int
    fal_micros: int
    difference_micros: int
    differs: bool

    def as_row(self) -> dict[str, Any]:
        return {
            "tag": f"{self.tag_key}={self.tag_value if self.tag_value is not None else '(none)'}",
            "our_requests": self.our_requests,
            "our_micros": self.our_micros,
            "fal_requests": self.fal_requests,
            "fal_micros": self.fal_micros,
            "difference_micros": self.difference_micros,
        }


@dataclass
class TagComparison:
    """Every compared value of every tag key over a range."""

    start: dt.datetime
    end: dt.datetime
    totals: list[TagTotal] = field(default_factory=list)

    @property
    def differences(self) -> list[TagTotal]:
        return [t for t in self.totals if t.differs]

    def of(self, tag_key: str, tag_value: str | None) -> TagTotal | None:
        return next(
            (t for t in self.totals if t.tag_key == tag_key and t.tag_value == tag_value), None
        )

    def as_metadata(self) -> dict[str, Any]:
        return {
            "tag_values_compared": len(self.totals),
            "tag_values_differing": len(self.differences),
            "tag_difference_micros": sum(abs(t.difference_micros) for t in self.differences),
        }


def compare_usage_by_tag(
    conn: LedgerConnection,
    platform: FalPlatform,
    start: dt.datetime,
    end: dt.datetime,
    tag_keys: tuple[str, ...] = tuple(TAG_KEYS),
) -> TagComparison:
    """fal's usage by each tag in `tag_keys` over [start, end) beside the ledger's totals
    (one read-only query per key; nothing stored: the monthly asset shows the result)."""
    result = TagComparison(start, end)
    for tag_key in tag_keys:
        if tag_key not in TAG_KEYS:
            raise ValueError(f"tag_key: expected one of {sorted(TAG_KEYS)}, got {tag_key!r}")
        groups = platform.usage_by_tag(start, end, tag_key)
        params = {
            "tag_key": tag_key,
            "start": start,
            "end": end,
            "tag_values": [g.get("tag_value") for g in groups],
            "requests": [int(g.get("requests") or 0) for g in groups],
            "nanos": [int(g["cost_nano_usd"]) for g in groups],
        }
        with conn.transaction():
            rows = conn.execute(q("spend_compare_usage_by_tag"), params).fetchall()
        result.totals += [
            TagTotal(
                tag_key,
                row["tag_value"],
                int(row["our_requests"]),
                int(row["our_micros"]),
                int(row["fal_requests"]),
                int(row["fal_micros"]),
                int(row["difference_micros"]),
                bool(row["differs"]),
            )
            for row in rows
        ]
    return result
