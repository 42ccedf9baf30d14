"""From a checked row to a committed intent: price it, check the batch cap, record it.

One function decides every row of a batch inside the caller's transaction, so a row is
either an intent (pending, claimed by the run, to be sent to fal) or a rejection stored
with its field and reason. The user's monthly budget is not decided here: it is decided
once, when the item is sent (`claim_for_send`, the same admission on every path to fal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from renderqueue_pipeline.batch.rows import PromptRow, Rejection
from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.errors import LedgerInputError
from renderqueue_pipeline.ledger import Intent, record_intent
from renderqueue_pipeline.money import usd
from renderqueue_pipeline.redact import redact


@dataclass
class BatchCap:
    """`max_cost_usd` of a batch: estimates of its intents may not add up past it."""

    limit_micros: int | None
    used_micros: int = 0

    def reason(self, estimate_micros: int) -> str | None:
        if self.limit_micros is None:
            return None
        total = self.used_micros + estimate_micros
        if total <= self.limit_micros:
            return None
        return (
            f"over the batch's max_cost_usd {usd(self.limit_micros)}: batch so far "
            f"{usd(self.used_micros)} + this row {usd(estimate_micros)} = {usd(total)}"
        )


def column_of(field: str) -> str:
    """The ledger names inputs `inputs.duration`; a prompts file calls that column `duration`."""
    return field.removeprefix("inputs.")


def item_key(batch_id: int, line_no: int) -> str:
    """The idempotency key of a batch row: the same row of the same batch is one request."""
    return f"batch:{batch_id}:line:{line_no}"


def decide_row(
    conn: LedgerConnection,
    row: PromptRow,
    *,
    batch_id: int | None = None,
    cap: BatchCap | None = None,
    idempotency_key: str | None = None,
    claimer: str | None = None,
    lease_seconds: float | None = None,
) -> Intent | Rejection:
    """Record the row's intent (the ledger validates and prices it, and `claimer` claims
    it), then check the batch cap; a row that does not fit has its item rejected.

    Runs inside the caller's transaction, so nobody sees an intent that is then
    rejected; returns the rejection instead of raising. A stored rejection is marked
    `stored` (nothing left to write).
    """
    try:
        intent = record_intent(
            conn,
            user_id=row.user_id,
            endpoint=row.endpoint,
            inputs=row.inputs,
            idempotency_key=idempotency_key
            or (item_key(batch_id, row.line_no) if batch_id is not None else None),
            batch_id=batch_id,
            line_no=row.line_no if batch_id is not None else None,
            claimer=claimer,
            lease_seconds=lease_seconds,
        )
    except LedgerInputError as exc:
        return Rejection(
            row.line_no,
            column_of(exc.field),
            exc.reason,
            "invalid",
            row.user_id,
            row.endpoint,
            row.inputs,
        )
    if intent.state != "pending" or intent.request_id:
        return intent  # an earlier submission with this key: the caller decides
    estimate = intent.estimate.cost_micros
    field, reason = "max_cost_usd", cap.reason(estimate) if cap else None
    if reason is not None:
        conn.execute(
            q("reject_pending_item"),
            {"item_id": intent.item_id, "reason": reason, "kind": "over_budget", "field": field},
        )
        return Rejection(
            row.line_no,
            field,
            reason,
            "over_budget",
            row.user_id,
            row.endpoint,
            row.inputs,
            stored=True,
        )
    if cap:
        cap.used_micros += estimate
    return intent


def store_rejection(conn: LedgerConnection, batch_id: int, rejection: Rejection) -> None:
    """Record a rejected row as a batch item (never sent; its reason shown to users)."""
    if rejection.stored:
        return
    params: dict[str, Any] = {
        "batch_id": batch_id,
        "line_no": rejection.line_no,
        "idempotency_key": item_key(batch_id, rejection.line_no),
        "user_id": rejection.user_id,
        "endpoint": rejection.endpoint,
        "inputs": Jsonb(rejection.inputs) if rejection.inputs else None,
        "reason": redact(rejection.reason),
        "kind": rejection.kind,
        "field": rejection.field,
        "estimate_micros": None,
    }
    conn.execute(q("insert_rejected_item"), params)
