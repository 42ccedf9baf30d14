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
monthly budget would be exceeded; the message has the figures), `SubmissionInProgress`
(another call with the same idempotency key is being sent and gave no outcome within
RENDERQUEUE_SUBMIT_WAIT_SECONDS, or its sender stopped before fal answered: the
reconciler settles that one; this call sent nothing), `FalRejected` / `FalRequestError`
(fal refused it: nothing owed) or `FalSubmitOutcomeUnknown` (fal may have it: the intent
stays visible as an unknown outcome, never resubmitted silently).

An idempotency key reaches fal at most once: the first call claims the key's item (and is
admitted against the budget) in one transaction; a second call while the first is in
flight waits for its outcome and returns the same request id, never calling fal.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from renderqueue_pipeline.batch.budget import default_limit_from
from renderqueue_pipeline.batch.fal_answers import is_definite_rejection
from renderqueue_pipeline.batch.rows import PromptRow, RowDefaults, validate_row
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.server import database_url
from renderqueue_pipeline.errors import BudgetExceeded, LedgerInputError, SubmissionInProgress
from renderqueue_pipeline.fal_gateway import FalGateway, RequestIdentity
from renderqueue_pipeline.ledger import Intent, begin_submission, finish_submission, refresh_leases
from renderqueue_pipeline.settings import get_settings

if TYPE_CHECKING:
    from renderqueue_pipeline.fal_gateway import FalSubmitter

__all__ = ["BudgetExceeded", "SubmissionInProgress", "asubmit_prompt", "submit_prompt"]


def _record_intent(
    ledger_url: str,
    user_id: Any,
    endpoint: Any,
    prompt: Any,
    inputs: Mapping[str, Any] | None,
    idempotency_key: str | None,
    wait_seconds: float | None,
) -> Intent:
    raw = {**dict(inputs or {}), "prompt": prompt, "user_id": user_id, "endpoint": endpoint}
    checked = validate_row(0, raw, RowDefaults())
    if not isinstance(checked, PromptRow):
        raise LedgerInputError(checked.field, checked.reason)
    settings = get_settings()
    with connect(ledger_url, autocommit=True) as conn:
        return begin_submission(
            conn,
            user_id=checked.user_id,
            endpoint=checked.endpoint,
            inputs=checked.inputs,
            idempotency_key=idempotency_key,
            default_limit_micros=default_limit_from(settings),
            wait_seconds=settings.submit_wait_seconds if wait_seconds is None else wait_seconds,
            lease_seconds=settings.submit_lease_seconds,
        )


async def _keep_lease(ledger_url: str, claimer: str) -> None:
    """Refresh the claim's lease while fal is being called (a slow call stays ours)."""
    seconds = get_settings().submit_lease_seconds
    every = seconds / 4
    while True:
        await asyncio.sleep(every)

        def refresh() -> None:
            with connect(ledger_url, autocommit=True) as conn:
                refresh_leases(conn, claimer, seconds)

        with contextlib.suppress(Exception):  # a missed beat only shortens the lease
            await asyncio.to_thread(refresh)


async def asubmit_prompt(
    user_id: int,
    endpoint: str,
    prompt: str,
    inputs: Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    ledger_url: str | None = None,
    gateway: FalSubmitter | None = None,
    wait_seconds: float | None = None,
) -> str:
    """`submit_prompt` for async callers; pass a long-lived `FalGateway` to reuse it."""

    url = ledger_url or database_url()
    intent = await asyncio.to_thread(
        _record_intent, url, user_id, endpoint, prompt, inputs, idempotency_key, wait_seconds
    )
    if intent.request_id:  # the same idempotency key was submitted before
        return intent.request_id
    lease = asyncio.create_task(_keep_lease(url, intent.claimer or ""))
    identity = RequestIdentity(intent.item_id, intent.user_id)
    try:
        if gateway is None:
            async with FalGateway.from_settings(get_settings(), max_concurrency=1) as own:
                outcome: Any = await own.submit(
                    intent.endpoint, dict(intent.inputs), identity=identity, priority="normal"
                )
        else:
            # normal priority: a product's request starts before queued batch work (low)
            outcome = await gateway.submit(
                intent.endpoint, dict(intent.inputs), identity=identity, priority="normal"
            )
    except Exception as exc:  # noqa: BLE001 - any failure is an outcome finish() records
        outcome = exc
    finally:
        lease.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lease

    def finish() -> str:
        with connect(url, autocommit=True) as conn:
            return finish_submission(conn, intent, outcome, is_definite_rejection)

    return await asyncio.to_thread(finish)


def submit_prompt(
    user_id: int,
    endpoint: str,
    prompt: str,
    inputs: Mapping[str, Any] | None = None,
    *,
    idempotency_key: str | None = None,
    ledger_url: str | None = None,
    wait_seconds: float | None = None,
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
            wait_seconds=wait_seconds,
        )
    )
