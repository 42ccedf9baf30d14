"""The ledger's Python face: validate and record submissions, record events.

The rules themselves (forward-only status, idempotency, order independence, exact cost)
are SQL in sql/003_ledger_rules.sql; everything here calls them, so every writer --
submit, webhook receiver, reconciler -- goes through the same state machine.
"""

from renderqueue_pipeline.ledger.core import (
    Estimate,
    EventOutcome,
    Intent,
    LedgerEvent,
    apply_waiting_events,
    arecord_events,
    asubmit_generation,
    begin_submission,
    estimate_cost,
    event_from_fal_webhook,
    finish_submission,
    mark_unknown_outcomes,
    record_event,
    record_events,
    record_intent,
    record_rejected,
    record_submitted,
    submit_generation,
    validate_request,
)

__all__ = [
    "Estimate",
    "EventOutcome",
    "Intent",
    "LedgerEvent",
    "apply_waiting_events",
    "arecord_events",
    "asubmit_generation",
    "begin_submission",
    "estimate_cost",
    "event_from_fal_webhook",
    "finish_submission",
    "mark_unknown_outcomes",
    "record_event",
    "record_events",
    "record_intent",
    "record_rejected",
    "record_submitted",
    "submit_generation",
    "validate_request",
]
