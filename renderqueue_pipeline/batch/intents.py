"""From a checked row to a committed intent: price it, check budgets, record it.

One function decides every row, for batches and for single submissions alike, inside
the caller's transaction (which holds the users' budget locks), so a row is either an
intent (pending, to be sent to fal) or a rejection stored with its field and reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from renderqueue_pipeline.batch.budget import BudgetBook, usd
from renderqueue_pipeline.batch.rows import PromptRow, Rejection
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.errors import LedgerInputError
from renderqueue_pipeline.ledger import Intent, record_intent, validate_request


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
    conn: psycopg.Connection,
    row: PromptRow,
    book: BudgetBook,
    *,
    batch_id: int | None = None,
    cap: BatchCap | None = None,
    idempotency_key: str | None = None,
) -> Intent | Rejection:
    """Price the row, check the batch cap and the user's budget, then record the intent.

    Runs inside the caller's transaction; returns the rejection instead of raising.
    """
    try:
        estimate = validate_request(conn, row.endpoint, row.inputs, row.user_id, row=row.line_no)
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
    over_cap = cap.reason(estimate.cost_micros) if cap else None
    if over_cap:
        return Rejection(
            row.line_no,
            "max_cost_usd",
            over_cap,
            "over_budget",
            row.user_id,
            row.endpoint,
            row.inputs,
        )
    over_budget = book.admit(row.user_id, estimate.cost_micros)
    if over_budget:
        return Rejection(
            row.line_no,
            "budget",
            over_budget,
            "over_budget",
            row.user_id,
            row.endpoint,
            row.inputs,
        )
    intent = record_intent(
        conn,
        user_id=row.user_id,
        endpoint=row.endpoint,
        inputs=row.inputs,
        idempotency_key=idempotency_key
        or (item_key(batch_id, row.line_no) if batch_id is not None else None),
        batch_id=batch_id,
        line_no=row.line_no if batch_id is not None else None,
    )
    if cap:
        cap.used_micros += estimate.cost_micros
    return intent


def store_rejection(conn: psycopg.Connection, batch_id: int, rejection: Rejection) -> None:
    """Record a rejected row as a batch item (never sent; its reason shown to users)."""
    params: dict[str, Any] = {
        "batch_id": batch_id,
        "line_no": rejection.line_no,
        "idempotency_key": item_key(batch_id, rejection.line_no),
        "user_id": rejection.user_id,
        "endpoint": rejection.endpoint,
        "inputs": Jsonb(rejection.inputs) if rejection.inputs else None,
        "reason": rejection.reason,
        "kind": rejection.kind,
        "field": rejection.field,
        "estimate_micros": None,
    }
    conn.execute(q("insert_rejected_item"), params)
