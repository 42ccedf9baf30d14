"""One generation for the product backend: the same checks, budget and ledger path as a batch.

    from renderqueue_pipeline.batch import submit_prompt

    request_id = submit_prompt(
        user_id=42,
        endpoint="bytedance/seedance-2.0/text-to-video",
        prompt="a red fox trotting through fresh snow",
        inputs={"duration": "5", "resolution": "720p"},
        idempotency_key="order-8812",   # optional: the same key never submits twice
    )

Raises `LedgerInputError` (bad input; `.field` names it), `BudgetExceeded` (the user's
monthly budget would be exceeded; the message has the figures), `FalRejected` /
`FalRequestError` (fal refused it: nothing owed) or `FalSubmitOutcomeUnknown` (fal may
have it: the intent stays visible as an unknown outcome, never resubmitted silently).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from renderqueue_pipeline.batch.budget import BudgetBook, default_limit_micros
from renderqueue_pipeline.batch.intents import decide_row
from renderqueue_pipeline.batch.rows import PromptRow, RowDefaults, validate_row
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.errors import LedgerInputError, RenderqueueError
from renderqueue_pipeline.ledger import Intent, finish_submission


class BudgetExceeded(RenderqueueError):
    """The request would take the user past their monthly budget; nothing was sent."""

    def __init__(self, user_id: int, reason: str) -> None:
        self.user_id = user_id
        super().__init__(reason)


def _definite(exc: BaseException) -> bool:
    from renderqueue_pipeline.fal_gateway import FalRequestError

    return isinstance(exc, FalRequestError)


def _record_intent(
    ledger_url: str,
    user_id: Any,
    endpoint: Any,
    prompt: Any,
    inputs: Mapping[str, Any] | None,
    idempotency_key: str | None,
) -> Intent:
    raw = {**dict(inputs or {}), "prompt": prompt, "user_id": user_id, "endpoint": endpoint}
    checked = validate_row(0, raw, RowDefaults())
    if not isinstance(checked, PromptRow):
        raise LedgerInputError(checked.field, checked.reason)
    default_limit = default_limit_micros()
    with connect(ledger_url, autocommit=True) as conn, conn.transaction():
        book = BudgetBook(conn, default_limit)
        decided = decide_row(
            conn,
            PromptRow(0, checked.user_id, checked.endpoint, checked.inputs),
            book,
            idempotency_key=idempotency_key,
        )
        # raised inside the transaction: a refused request leaves no item behind, so the
        # same idempotency key can be tried again once the budget allows it
        if not isinstance(decided, Intent):
            if decided.kind == "over_budget":
                raise BudgetExceeded(checked.user_id, decided.reason)
            raise LedgerInputError(decided.field, decided.reason)
    if decided.state not in ("pending", "submitted"):
        raise LedgerInputError(
            "idempotency_key", f"item {decided.item_id} is {decided.state}; not submitting again"
        )
    return decided


async def asubmit_prompt(
    user_id: int,
    endpoint: str,
    prompt: str,
    inputs: Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    ledger_url: str | None = None,
    gateway: Any = None,
) -> str:
    """`submit_prompt` for async callers; pass a long-lived `FalGateway` to reuse it."""
    from renderqueue_pipeline.db.server import database_url
    from renderqueue_pipeline.fal_gateway import FalGateway, RequestIdentity

    url = ledger_url or database_url()
    intent = await asyncio.to_thread(
        _record_intent, url, user_id, endpoint, prompt, inputs, idempotency_key
    )
    if intent.request_id:  # the same idempotency key was submitted before
        return intent.request_id
    identity = RequestIdentity(intent.item_id, intent.user_id)
    try:
        if gateway is None:
            async with FalGateway.from_settings(max_concurrency=1) as own:
                outcome: Any = await own.submit(
                    intent.endpoint, dict(intent.inputs), identity=identity
                )
        else:
            outcome = await gateway.submit(intent.endpoint, dict(intent.inputs), identity=identity)
    except Exception as exc:
        outcome = exc

    def finish() -> str:
        with connect(url, autocommit=True) as conn:
            return finish_submission(conn, intent, outcome, _definite)

    return await asyncio.to_thread(finish)


def submit_prompt(
    user_id: int,
    endpoint: str,
    prompt: str,
    inputs: Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    ledger_url: str | None = None,
) -> str:
    """Submit one generation for `user_id` and return fal's request id (see module doc)."""
    return asyncio.run(
        asubmit_prompt(
            user_id,
            endpoint,
            prompt,
            inputs,
            idempotency_key=idempotency_key,
            ledger_url=ledger_url,
        )
    )
