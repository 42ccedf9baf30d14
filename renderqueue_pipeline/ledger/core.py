"""Validate, record and apply: the ledger operations every writer uses."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from decimal import Decimal
from typing import Any, Literal, Protocol, cast

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from renderqueue_pipeline.db import LedgerConnection, one_row
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.errors import BudgetExceeded, LedgerInputError, SubmissionInProgress
from renderqueue_pipeline.redact import redact
from renderqueue_pipeline.settings import Settings

EventKind = Literal["in_progress", "completed", "failed", "canceled"]
EventSource = Literal["webhook", "reconcile", "api"]
EventOutcome = Literal["applied", "duplicate", "stale", "conflict", "waiting"]

_BIGINT_MAX = 2**63 - 1
APPLY_CHUNK = 200  # waiting events per transaction: a few hundred locks at most

# What a caller that passes nothing gets: the settings' defaults, read from their one
# definition (settings.py); entry points pass the configured values down.
_DEFAULTS = Settings.model_fields
DEFAULT_LEASE_SECONDS: float = _DEFAULTS["submit_lease_seconds"].default
DEFAULT_WAIT_SECONDS: float = _DEFAULTS["submit_wait_seconds"].default
DEFAULT_EVENT_RETENTION = timedelta(days=_DEFAULTS["event_retention_days"].default)


@dataclass(frozen=True)
class Estimate:
    """What a request will cost by the price table in force when it is submitted."""

    price_id: int
    seconds: Decimal
    cost_micros: int
    price_version: str


@dataclass(frozen=True)
class Intent:
    """A batch item: the record of an intent to submit, written before fal is called."""

    item_id: int
    state: str
    request_id: str | None
    user_id: int
    endpoint: str
    inputs: dict[str, Any]
    estimate: Estimate
    #: who claimed the item (may send it, and record its outcome); see `claim_for_send`
    claimer: str | None = None


@dataclass(frozen=True)
class LedgerEvent:
    """Something fal told us about a request (a webhook, or a status/result we polled)."""

    request_id: str
    kind: EventKind
    payload: Any = None
    error: str | None = None
    source: EventSource = "webhook"
    gateway_request_id: str | None = None


# -- validation -----------------------------------------------------------------------


def validate_request(
    conn: LedgerConnection,
    endpoint: Any,
    inputs: Any,
    user_id: Any,
    *,
    row: str | int | None = None,
) -> Estimate:
    """Check one request and price it; raise LedgerInputError naming the field otherwise.

    Writes nothing. `row` (a line number or key) is carried into the error message.
    """
    if isinstance(user_id, bool) or not isinstance(user_id, int):
        raise LedgerInputError("user_id", f"expected an integer, got {user_id!r}", row=row)
    if not 0 <= user_id <= _BIGINT_MAX:
        raise LedgerInputError("user_id", f"must be between 0 and 2^63-1, got {user_id}", row=row)
    if not isinstance(endpoint, str) or endpoint.count("/") < 1 or not endpoint.strip():
        raise LedgerInputError(
            "endpoint", f"expected an endpoint id like owner/app/path, got {endpoint!r}", row=row
        )
    if not isinstance(inputs, Mapping):
        raise LedgerInputError(
            "inputs", f"expected a JSON object, got {type(inputs).__name__}", row=row
        )
    prompt = inputs.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise LedgerInputError("inputs.prompt", "missing or empty", row=row)
    audio = inputs.get("generate_audio")
    if audio is not None and not isinstance(audio, bool):
        raise LedgerInputError(
            "inputs.generate_audio", f"expected true or false, got {audio!r}", row=row
        )
    try:
        json.dumps(dict(inputs), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LedgerInputError("inputs", f"not storable as JSON: {exc}", row=row) from None

    # The duration is read by SQL's rq_parse_duration, the one definition
    # (sql/functions/ledger.sql).
    params = {"endpoint": endpoint, "inputs": Jsonb(dict(inputs)), "at": None}
    found = one_row(conn.execute(q("validate_and_estimate"), params))
    if found["duration_problem"] is not None:
        raise LedgerInputError("inputs.duration", found["duration_problem"], row=row)
    if found["price_id"] is not None:
        return Estimate(
            price_id=found["price_id"],
            seconds=Decimal(found["seconds"]),
            cost_micros=int(found["cost_micros"]),
            price_version=found["price_version"],
        )
    variants = conn.execute(q("endpoint_prices"), params).fetchall()
    if not variants:
        known = ", ".join(r["endpoint"] for r in conn.execute(q("priced_endpoints")).fetchall())
        raise LedgerInputError(
            "endpoint", f"no price for {endpoint!r}; priced endpoints: {known}", row=row
        )
    resolutions = sorted({v["resolution"] for v in variants if v["resolution"]})
    raise LedgerInputError(
        "inputs.resolution",
        f"{endpoint} has no price at resolution {inputs.get('resolution')!r}; "
        f"priced: {', '.join(resolutions)}",
        row=row,
    )


def estimate_cost(conn: LedgerConnection, endpoint: str, inputs: Mapping[str, Any]) -> Estimate:
    """The price of a request (validating it first)."""
    return validate_request(conn, endpoint, inputs, 0)


# -- submission (rule 1) --------------------------------------------------------------


def record_intent(
    conn: LedgerConnection,
    *,
    user_id: int,
    endpoint: str,
    inputs: Mapping[str, Any],
    idempotency_key: str | None = None,
    batch_id: int | None = None,
    line_no: int | None = None,
    claimer: str | None = None,
    lease_seconds: float | None = None,
) -> Intent:
    """Validate and write the intent record; an existing key returns the existing item.

    A new item is claimed by `claimer` with a lease (`lease_seconds`, default the setting);
    it is sent only once `claim_for_send` admits it. The caller commits before calling
    fal, so a crash after fal accepted the request leaves a `pending` item behind, which
    `mark_unknown_outcomes` turns into a visible 'unknown' once the lease expired.
    """
    estimate = validate_request(conn, endpoint, inputs, user_id, row=line_no)
    params = {
        "claimer": claimer,
        "lease": lease_interval(lease_seconds),
        "batch_id": batch_id,
        "line_no": line_no,
        "idempotency_key": idempotency_key or f"api:{uuid.uuid4()}",
        "user_id": user_id,
        "endpoint": endpoint,
        "inputs": Jsonb(dict(inputs)),
        "estimate_micros": estimate.cost_micros,
    }
    found = conn.execute(q("insert_batch_item"), params).fetchone()
    if found is None:
        found = one_row(conn.execute(q("batch_item_by_key"), params))
    return Intent(
        item_id=found["id"],
        state=found["state"],
        request_id=found["request_id"],
        user_id=user_id,
        endpoint=endpoint,
        inputs=dict(inputs),
        estimate=estimate,
        claimer=found["claimed_by"],
    )


def lease_interval(seconds: float | None = None) -> timedelta:
    """A sender's lease as an interval; None: RENDERQUEUE_SUBMIT_LEASE_SECONDS' default
    (entry points read the setting and pass it down)."""
    return timedelta(seconds=DEFAULT_LEASE_SECONDS if seconds is None else seconds)


def claim_for_send(
    conn: LedgerConnection,
    item_ids: list[int],
    claimer: str,
    *,
    lease_seconds: float | None = None,
    default_limit_micros: int | None = None,
) -> dict[int, tuple[bool, str | None]]:
    """THE admission, just before fal is called: {item: (admitted, reason if not)}.

    One statement (rq_claim_for_send, sql/functions/admission.sql) for many items: under each
    user's budget lock it admits the items that fit the budget of the current UTC month
    (the month the request reaches fal) and claims them for `claimer`; the others are
    rejected as over budget with the figures. Items it leaves out were not claimable (another live
    claimer holds them, or they moved on): do not send those.
    """
    rows = conn.execute(
        q("claim_for_send"),
        {
            "item_ids": item_ids,
            "claimer": claimer,
            "lease": lease_interval(lease_seconds),
            "default_limit": default_limit_micros,
        },
    ).fetchall()
    return {r["item_id"]: (r["admitted"], r["reason"]) for r in rows}


def refresh_leases(conn: LedgerConnection, claimer: str, lease_seconds: float | None = None) -> int:
    """A sender's heartbeat: extend the lease of its pending items; how many."""
    cursor = conn.execute(
        q("refresh_leases"), {"claimer": claimer, "lease": lease_interval(lease_seconds)}
    )
    return cursor.rowcount


def record_submitted(
    conn: LedgerConnection,
    intent: Intent,
    request_id: str,
    fal_expires_at: dt.datetime | None = None,
) -> None:
    """In one transaction: insert the generation row and mark the intent submitted.

    Events that arrived before this row are applied by the insert trigger, in this same
    transaction. `fal_expires_at`: when fal deletes the outputs (the lifecycle asked for).
    """
    if not request_id:
        raise LedgerInputError("request_id", "fal returned an empty request id")
    with conn.transaction():
        inserted = conn.execute(
            q("insert_generation"),
            {
                "request_id": request_id,
                "user_id": intent.user_id,
                "endpoint": intent.endpoint,
                "inputs": Jsonb(intent.inputs),
                "cost_micros": intent.estimate.cost_micros,
                "price_id": intent.estimate.price_id,
                "seconds": intent.estimate.seconds,
                "batch_item_id": intent.item_id,
                "fal_expires_at": fal_expires_at,
                "claimer": intent.claimer,
            },
        ).fetchone()
        if inserted is None:
            item = conn.execute(q("batch_item_state"), {"item_id": intent.item_id}).fetchone()
            if item is not None and item["request_id"] == request_id:
                return  # recorded before: a repeat is a no-op
            state = "missing" if item is None else item["state"]
            raise LedgerInputError(
                "batch_item_id",
                f"item {intent.item_id} is {state}, not the pending item claimed by "
                f"{intent.claimer}: request {request_id} is not recorded on it",
            )
        conn.execute(
            q("mark_item_submitted"), {"request_id": request_id, "item_id": intent.item_id}
        )


def record_rejected(conn: LedgerConnection, intent: Intent, reason: str) -> None:
    """fal refused the request for certain (nothing was queued): say why on the item."""
    with conn.transaction():
        conn.execute(
            q("mark_item_rejected"),
            {"item_id": intent.item_id, "reason": redact(reason), "claimer": intent.claimer},
        )


def mark_unknown_outcomes(conn: LedgerConnection, older_than: str = "10 minutes") -> list[dict]:
    """Intents still pending after `older_than` whose sender's lease expired.

    fal may hold a request we have no row for. A live sender (refreshing its lease, also
    while throttled) keeps its items; a later definite outcome still wins over `unknown`.
    """
    with conn.transaction():
        return conn.execute(q("mark_unknown_outcomes"), {"older_than": older_than}).fetchall()


def begin_submission(
    conn: LedgerConnection,
    *,
    user_id: int,
    endpoint: str,
    inputs: Mapping[str, Any],
    idempotency_key: str | None = None,
    default_limit_micros: int | None = None,
    wait_seconds: float | None = None,
    lease_seconds: float | None = None,
) -> Intent:
    """Rule 1, step one: validate, commit the intent and claim it (admitted) before fal.

    A key is claimed once: the first caller records and claims the item in one
    transaction, admitted against the user's budget (`default_limit_micros`: the budget
    of users without a `user_budgets` row; over it raises BudgetExceeded and leaves no
    item). A later caller of the same key never calls fal: it gets the recorded request
    id (the returned intent carries it), waits up to `wait_seconds` (default
    RENDERQUEUE_SUBMIT_WAIT_SECONDS' default) for an in-flight first caller's outcome, or raises
    SubmissionInProgress; an item left pending by a sender that stopped is the
    reconciler's, never resent. A `rejected` or `unknown` item raises LedgerInputError.
    """
    if wait_seconds is None:
        wait_seconds = DEFAULT_WAIT_SECONDS
    deadline = time.monotonic() + wait_seconds
    claimer = f"api:{uuid.uuid4()}"
    with conn.transaction():
        intent = record_intent(
            conn,
            user_id=user_id,
            endpoint=endpoint,
            inputs=inputs,
            idempotency_key=idempotency_key,
            claimer=claimer,
            lease_seconds=lease_seconds,
        )
        if intent.state == "pending" and intent.request_id is None:
            claimed = claim_for_send(
                conn,
                [intent.item_id],
                claimer,
                lease_seconds=lease_seconds,
                default_limit_micros=default_limit_micros,
            )
            if intent.item_id in claimed:
                admitted, reason = claimed[intent.item_id]
                if not admitted:  # raised inside: the refused request leaves no item
                    raise BudgetExceeded(user_id, reason or "over budget")
                return replace(intent, claimer=claimer)
    return await_outcome(conn, intent, deadline)


def await_outcome(conn: LedgerConnection, intent: Intent, deadline: float) -> Intent:
    """Another caller holds the key's item: its outcome, or SubmissionInProgress by `deadline`.

    Returns the intent with the recorded request id; never calls fal.
    """
    while True:
        with conn.transaction():
            item = one_row(conn.execute(q("batch_item_outcome"), {"item_id": intent.item_id}))
        state = item["state"]
        if state == "submitted":
            return replace(intent, state=state, request_id=item["request_id"])
        if state in ("rejected", "unknown"):
            because = f": {item['reason']}" if item["reason"] else ""
            raise LedgerInputError(
                "idempotency_key",
                f"item {intent.item_id} is {state}; not submitting again{because}",
            )
        if item["lease_expired"]:
            raise SubmissionInProgress(
                intent.item_id,
                "was left pending by a sender that stopped before fal answered; the "
                "reconciler settles it (it is never resent blindly)",
            )
        if time.monotonic() >= deadline:
            raise SubmissionInProgress(
                intent.item_id,
                f"is being submitted by another caller ({item['claimed_by']}) with no "
                "outcome yet: try again later for its request id",
            )
        time.sleep(0.05)


class Submitted(Protocol):
    """What a submit may return instead of a bare request id (e.g. the gateway's result)."""

    request_id: str
    fal_expires_at: dt.datetime | None


def finish_submission(
    conn: LedgerConnection,
    intent: Intent,
    outcome: str | Submitted | BaseException,
    is_definite_rejection: Callable[[BaseException], bool] = lambda exc: False,
) -> str:
    """Rule 1, step two: record fal's answer (a request_id) or its failure.

    A failure that `is_definite_rejection` recognises marks the item rejected and re-raises;
    any other failure leaves the item pending (an unknown outcome, never resubmitted
    silently) and re-raises. An outcome with a `fal_expires_at` (the gateway's
    SubmitResult) records when fal deletes the outputs.
    """
    if isinstance(outcome, BaseException):
        if is_definite_rejection(outcome):
            record_rejected(conn, intent, str(outcome))
        raise outcome
    if isinstance(outcome, str):
        record_submitted(conn, intent, outcome)
        return outcome
    record_submitted(conn, intent, outcome.request_id, getattr(outcome, "fal_expires_at", None))
    return outcome.request_id


def _submit_generation(
    conn: LedgerConnection,
    submit: Callable[[str, dict[str, Any]], str | Submitted],
    *,
    user_id: int,
    endpoint: str,
    inputs: Mapping[str, Any],
    idempotency_key: str | None = None,
    is_definite_rejection: Callable[[BaseException], bool] = lambda exc: False,
    default_limit_micros: int | None = None,
) -> str:
    """Submit one generation following rule 1 with a blocking `submit(endpoint, inputs)`.

    Private: it takes the budget default from its caller (none unless given), so only the
    tests use it; products submit through `batch.submit_prompt`, which applies the budget.

    Re-running with the same idempotency key returns the recorded request_id without
    calling fal again (see `begin_submission`).
    """
    intent = begin_submission(
        conn,
        user_id=user_id,
        endpoint=endpoint,
        inputs=inputs,
        idempotency_key=idempotency_key,
        default_limit_micros=default_limit_micros,
    )
    if intent.request_id:
        return intent.request_id
    try:
        outcome: str | Submitted | BaseException = submit(endpoint, dict(inputs))
    except Exception as exc:  # noqa: BLE001 - any failure is an outcome finish_submission records
        outcome = exc
    return finish_submission(conn, intent, outcome, is_definite_rejection)


async def _asubmit_generation(
    conn: LedgerConnection,
    submit: Callable[[str, dict[str, Any]], Awaitable[str | Submitted]],
    *,
    user_id: int,
    endpoint: str,
    inputs: Mapping[str, Any],
    idempotency_key: str | None = None,
    is_definite_rejection: Callable[[BaseException], bool] = lambda exc: False,
    default_limit_micros: int | None = None,
) -> str:
    """`_submit_generation` for an async `submit` (e.g. the fal gateway).

    The ledger writes are short and run on the caller's connection in a worker thread;
    give each concurrent submission its own connection.
    """
    intent = await asyncio.to_thread(
        begin_submission,
        conn,
        user_id=user_id,
        endpoint=endpoint,
        inputs=inputs,
        idempotency_key=idempotency_key,
        default_limit_micros=default_limit_micros,
    )
    if intent.request_id:
        return intent.request_id
    try:
        outcome: str | Submitted | BaseException = await submit(endpoint, dict(inputs))
    except Exception as exc:  # noqa: BLE001 - any failure is an outcome finish_submission records
        outcome = exc
    return await asyncio.to_thread(finish_submission, conn, intent, outcome, is_definite_rejection)


# -- events (rules 2-6) ---------------------------------------------------------------


def event_from_fal_webhook(body: Mapping[str, Any]) -> LedgerEvent:
    """Map fal's webhook body to a ledger event (OK -> completed, ERROR -> failed).

    Reads only the envelope fal documents (request_id, gateway_request_id, status,
    payload, error, payload_error); the payload is stored as sent.
    """
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise LedgerInputError("request_id", "missing from the webhook body")
    status = body.get("status")
    gateway_request_id = body.get("gateway_request_id")
    if status == "OK" and body.get("payload") is None:
        # finished, but fal could not serialise the output; the result endpoint has it
        reason = body.get("payload_error") or "completed without a payload"
        return LedgerEvent(
            request_id, "completed", None, str(reason), "webhook", gateway_request_id
        )
    if status == "OK":
        return LedgerEvent(
            request_id, "completed", body.get("payload"), None, "webhook", gateway_request_id
        )
    if status == "ERROR":
        # fal sends no cancel event: rq_next turns an ERROR on a row whose cancel fal
        # accepted (mark_cancel_requested) into `canceled`.
        error = body.get("error") or body.get("payload_error") or "generation failed"
        return LedgerEvent(
            request_id, "failed", body.get("payload"), str(error), "webhook", gateway_request_id
        )
    raise LedgerInputError("status", f"expected 'OK' or 'ERROR', got {status!r}")


def _batch(events: list[LedgerEvent]) -> dict[str, Any]:
    """Parameters of `record_events_batch`: the events as a JSON array, in input order.

    rq_record_events takes the per-request locks in request_id order itself, so concurrent
    batches cannot deadlock whatever order they arrive in.
    """
    document = [
        {
            "request_id": event.request_id,
            "source": event.source,
            "kind": event.kind,
            "payload": event.payload,
            "error": event.error,
            # dedupe ignores it: fal changes it when it retries internally
            "gateway_request_id": event.gateway_request_id,
        }
        for event in events
    ]
    return {"events": Jsonb(document)}


def _in_input_order(rows: list[dict[str, Any]], count: int) -> list[EventOutcome]:
    """Outcomes by `ord`, the 1-based position of each event in the array."""
    if len(rows) != count:
        raise psycopg.DataError(f"{len(rows)} outcomes for {count} events")
    outcomes: list[EventOutcome | None] = [None] * count
    for row in rows:
        outcomes[row["ord"] - 1] = row["outcome"]
    return cast(list[EventOutcome], outcomes)  # every ord of 1..count came back once


def record_event(conn: LedgerConnection, event: LedgerEvent) -> EventOutcome:
    """Store one event durably and apply it; commit before returning."""
    return record_events(conn, [event])[0]


def record_events(conn: LedgerConnection, events: Iterable[LedgerEvent]) -> list[EventOutcome]:
    """Store and apply many events in ONE statement and transaction; outcomes in input order."""
    events = list(events)
    params = _batch(events)
    cursor = conn.cursor(row_factory=dict_row)  # whatever the connection's row factory
    if conn.autocommit:  # the one statement is its own transaction: no BEGIN/COMMIT trips
        rows = cursor.execute(q("record_events_batch"), params).fetchall()
    else:
        with conn.transaction():
            rows = cursor.execute(q("record_events_batch"), params).fetchall()
    return _in_input_order(rows, len(events))


async def arecord_events(
    conn: psycopg.AsyncConnection, events: list[LedgerEvent]
) -> list[EventOutcome]:
    """`record_events` on an async autocommit connection (the statement is the transaction)."""
    cursor = conn.cursor(row_factory=dict_row)
    await cursor.execute(q("record_events_batch"), _batch(events))
    return _in_input_order(await cursor.fetchall(), len(events))


def mark_cancel_requested(conn: LedgerConnection, request_id: str) -> bool:
    """Record that fal accepted our cancel (202) for `request_id`; commit.

    Cancelling only signals fal: an ERROR outcome after this is the cancellation (the row
    becomes `canceled`, cost 0), a completion is billed as usual. False when there is no
    row for the request; the first time recorded is kept.
    """
    with conn.transaction():
        found = conn.execute(q("mark_cancel_requested"), {"request_id": request_id}).fetchone()
    return found is not None


def ledger_now(conn: LedgerConnection) -> dt.datetime:
    """The ledger's clock, `rq_now()`: what decides a month, also for Python callers (a
    session may pin it with `renderqueue.now`, as tests that cross month ends do)."""
    return _first(conn.execute(q("ledger_now")).fetchone())


@dataclass(frozen=True)
class CancelIntent:
    """Our cancel of one request, recorded before fal is asked.

    `newly_recorded`: this call wrote it (an earlier cancel's moment is kept), so only then
    may a definite refusal from fal withdraw it.
    """

    request_id: str
    recorded_at: dt.datetime
    newly_recorded: bool


def record_cancel_intent(conn: LedgerConnection, request_id: str) -> CancelIntent | None:
    """Record that we are about to ask fal to cancel `request_id`; commit.

    Written first, as a submit writes its intent first: fal's ERROR for a cancelled queued
    request can land before fal's 202 reaches us, and the ledger maps an ERROR on a row with
    a recorded cancel to `canceled`. None when there is no row for the request.
    """
    with conn.transaction():
        cursor = conn.cursor(row_factory=dict_row)
        row = cursor.execute(q("record_cancel_intent"), {"request_id": request_id}).fetchone()
    if row is None:
        return None
    return CancelIntent(request_id, row["cancel_requested_at"], bool(row["newly_recorded"]))


def withdraw_cancel_intent(conn: LedgerConnection, intent: CancelIntent) -> bool:
    """fal refused the cancel definitively: withdraw the intent this caller recorded; commit.

    Only a refusal withdraws (already completed, not found); an unanswered cancel keeps the
    intent (fal may have received it). An intent recorded by an earlier cancel is kept.
    """
    if not intent.newly_recorded:
        return False
    with conn.transaction():
        found = conn.execute(
            q("withdraw_cancel_intent"),
            {"request_id": intent.request_id, "recorded_at": intent.recorded_at},
        ).fetchone()
    return found is not None


def expire_waiting_events(conn: LedgerConnection, retention: timedelta | None = None) -> int:
    """Mark events that waited longer than `retention` for a row that never came; commit.

    Default retention: RENDERQUEUE_EVENT_RETENTION_DAYS' default (7 days; the reconciler
    passes the setting: `ReconcileOptions.event_retention`). The events are kept
    (and still applied should their row appear); returns how many were newly marked.
    """
    if retention is None:
        retention = DEFAULT_EVENT_RETENTION
    with conn.transaction():
        found = conn.execute(q("expire_waiting_events"), {"retention": retention}).fetchone()
    return int(_first(found))


def expired_event_count(conn: LedgerConnection) -> int:
    """Events still waiting for their row after the retention period (for /metrics)."""
    return int(_first(conn.execute(q("expired_event_count")).fetchone()))


def _first(row: Any) -> Any:
    """The first column of a row, whatever the connection's row factory."""
    return next(iter(row.values())) if isinstance(row, Mapping) else row[0]


def apply_waiting_events(
    conn: LedgerConnection,
    limit: int = 10_000,
    *,
    chunk: int = APPLY_CHUNK,
    retention: timedelta | None = None,
) -> Counter[str]:
    """Apply stored events whose row has appeared since, then expire the stale ones.

    The reconciler calls this every few minutes. Work goes in chunks of `chunk` events,
    each its own transaction (locks taken in rq_record_events' order, so never more than a
    few hundred, and no deadlock with the webhook receiver). An event that cannot be
    applied is skipped with the reason stored on it (outcome 'error'); events that failed
    before are tried after the others. Returns outcomes counted, plus 'expired'.
    """
    outcomes: Counter[str] = Counter()
    with conn.transaction():
        started = _first(conn.execute("select now()").fetchone())
    done = 0
    for failed_before in (False, True):
        after = 0
        while done < limit:
            with conn.transaction():
                params = {
                    "after": after,
                    "failed": failed_before,
                    "started": started,
                    "limit": min(chunk, limit - done),
                }
                ids = [_first(r) for r in conn.execute(q("waiting_events_with_row"), params)]
                if not ids:
                    break
                cursor = conn.cursor(row_factory=dict_row)
                rows = cursor.execute(q("apply_events"), {"event_ids": ids}).fetchall()
            outcomes.update(row["outcome"] for row in rows)
            after = ids[-1]
            done += len(ids)
    expired = expire_waiting_events(conn, retention)
    if expired:
        outcomes["expired"] += expired
    return outcomes


def waiting_events(conn: LedgerConnection, limit: int = 100) -> list[dict[str, Any]]:
    """Events not applied yet, oldest first: why each waits (no row, expired, an error)."""
    cursor = conn.cursor(row_factory=dict_row)
    return cursor.execute(q("waiting_events"), {"limit": limit}).fetchall()
