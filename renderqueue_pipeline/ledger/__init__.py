"""The ledger's Python face: validate and record submissions, record events.

The rules themselves (forward-only status, idempotency, order independence, exact cost)
are SQL in sql/003_state_machine.sql (the state machine `rq_next` and its writers);
everything here calls them, so every writer -- submit, webhook receiver, reconciler --
goes through the same state machine.
"""

from renderqueue_pipeline.ledger.core import (
    Estimate,
    EventOutcome,
    Intent,
    LedgerEvent,
    apply_waiting_events,
    arecord_events,
    asubmit_generation,
    await_outcome,
    begin_submission,
    claim_for_send,
    estimate_cost,
    event_from_fal_webhook,
    expire_waiting_events,
    expired_event_count,
    finish_submission,
    lease_interval,
    mark_cancel_requested,
    mark_unknown_outcomes,
    record_event,
    record_events,
    record_intent,
    record_rejected,
    record_submitted,
    refresh_leases,
    submit_generation,
    validate_request,
    waiting_events,
)

__all__ = [
    "Estimate",
    "EventOutcome",
    "Intent",
    "LedgerEvent",
    "apply_waiting_events",
    "arecord_events",
    "asubmit_generation",
    "await_outcome",
    "begin_submission",
    "claim_for_send",
    "estimate_cost",
    "event_from_fal_webhook",
    "expire_waiting_events",
    "expired_event_count",
    "finish_submission",
    "lease_interval",
    "mark_cancel_requested",
    "mark_unknown_outcomes",
    "record_event",
    "record_events",
    "record_intent",
    "record_rejected",
    "record_submitted",
    "refresh_leases",
    "submit_generation",
    "validate_request",
    "waiting_events",
]
