"""Cancel a batch: stop submitting its rows and ask fal to cancel what is queued or running.

The batch is marked `canceled` first, so a run still submitting it stops at its next
chunk. Then each of its generations still `submitted` or `in_progress` gets a cancel
through the gateway. The intent is recorded before fal is asked (`record_cancel_intent`,
as a submit records its intent first): fal's ERROR for a cancelled queued request can
land before its 202 reaches us, and the ledger turns an ERROR on a row with a recorded
cancel into `canceled`. fal's 202 only means "cancellation requested": a running request
may still finish, and is then billed. A definite refusal (already completed, not found,
any other 4xx) withdraws the intent, so a later ERROR stays a failure; an unanswered
cancel (fal unreachable, 5xx) keeps it, since fal may have received it. Every outcome is
stored on the batch item (`cancel_outcome`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from renderqueue_pipeline.batch.report import BatchNotFound
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.db.server import database_url
from renderqueue_pipeline.fal_gateway import FalError, FalNotFound, FalRequestError
from renderqueue_pipeline.ledger import (
    CancelIntent,
    record_cancel_intent,
    withdraw_cancel_intent,
)
from renderqueue_pipeline.redact import redact

if TYPE_CHECKING:
    from renderqueue_pipeline.fal_gateway import FalCanceller


@dataclass(frozen=True)
class CancelResult:
    batch_id: int
    asked: int
    outcomes: Counter[str]
    errors: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        parts = ", ".join(
            f"{n} {name.replace('_', ' ')}" for name, n in sorted(self.outcomes.items())
        )
        return f"batch {self.batch_id} canceled: {self.asked} open requests asked to cancel" + (
            f" ({parts})" if parts else ""
        )


async def _cancel_all(
    ledger_url: str,
    batch_id: int,
    concurrency: int,
    gateway_factory: Callable[[int], FalCanceller],
    log: Callable[[str], None],
) -> CancelResult:

    def open_requests() -> list[dict[str, Any]]:
        with connect(ledger_url, autocommit=True) as conn:
            with conn.transaction():
                if (
                    conn.execute(q("mark_batch_canceled"), {"batch_id": batch_id}).fetchone()
                    is None
                ):
                    raise BatchNotFound(f"no batch {batch_id} (see `renderqueue batch list`)")
            return conn.execute(q("batch_open_requests"), {"batch_id": batch_id}).fetchall()

    rows = await asyncio.to_thread(open_requests)
    log(f"batch {batch_id}: marked canceled; {len(rows)} requests are queued or running at fal")
    outcomes: Counter[str] = Counter()
    errors: list[dict[str, Any]] = []
    conn = await asyncio.to_thread(connect, ledger_url, autocommit=True)

    def record(row: dict[str, Any], outcome: str, withdraw: CancelIntent | None) -> None:
        if withdraw is not None:
            withdraw_cancel_intent(conn, withdraw)
        with conn.transaction():
            conn.execute(
                q("record_cancel_outcome"), {"item_id": row["item_id"], "outcome": outcome}
            )

    lock = asyncio.Lock()  # one connection: record outcomes one at a time
    try:
        async with gateway_factory(concurrency) as gateway:

            async def one(row: dict[str, Any]) -> None:
                stored: str
                async with lock:  # the intent first: fal's ERROR may beat its 202
                    intent = await asyncio.to_thread(record_cancel_intent, conn, row["request_id"])
                refused = False
                try:
                    outcome = stored = await gateway.cancel(row["endpoint"], row["request_id"])
                    refused = outcome == "already_completed"
                except FalNotFound:
                    outcome = stored = "not_found"
                    refused = True
                except FalError as exc:
                    outcome, stored = "error", redact(f"error: {exc}")
                    refused = isinstance(exc, FalRequestError)  # fal answered: not accepted
                    errors.append(
                        {
                            "line_no": row["line_no"],
                            "request_id": row["request_id"],
                            "error": redact(exc),
                        }
                    )
                async with lock:
                    await asyncio.to_thread(record, row, stored, intent if refused else None)
                outcomes[outcome] += 1

            await asyncio.gather(*(one(row) for row in rows))
    finally:
        await asyncio.to_thread(conn.close)
    return CancelResult(batch_id, len(rows), outcomes, errors)


def cancel_batch(
    batch_id: int,
    *,
    ledger_url: str | None = None,
    concurrency: int = 16,
    log: Callable[[str], None] = lambda line: None,
    gateway_factory: Callable[[int], FalCanceller],
) -> CancelResult:
    """Cancel batch `batch_id` (see the module doc); BatchNotFound for an unknown id.

    `gateway_factory(n)` makes the gateway (n calls in flight): the CLI's from the
    settings, Dagster's from the `fal` resource."""

    return asyncio.run(
        _cancel_all(ledger_url or database_url(), batch_id, concurrency, gateway_factory, log)
    )
