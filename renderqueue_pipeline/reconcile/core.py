"""The reconciler: bring rows whose webhook never came (or came empty) to fal's truth.

One pass (`reconcile`):

1. applies stored events whose generation row appeared after them;
2. reads fal's request list and adopts every request whose tags name an item of ours
   that has no request yet; records second requests (and asks fal to cancel them) and
   orphans (reconcile/adopt.py); then marks batch items still stuck `pending` as unknown
   outcome (never resubmitted silently);
3. picks open rows older than `min_age` (through the partial index generations_open_idx)
   and completed rows whose webhook carried no payload (fal keeps a result about an hour,
   so these are fetched on the first pass, whatever their age);
4. asks fal for each one's status through the gateway, `concurrency` at a time, fetches
   the results of completed ones, and records what it learned through the ledger's one
   writer (`record_events`, source 'reconcile'), in chunks as it goes.

What fal says decides, never a guessed error string:
- COMPLETED without error: the result is fetched and applied (a result fal no longer
  keeps still completes the row; its estimate stands);
- COMPLETED with an error (a model error, fal's 504 user timeout, a cancelled request):
  terminal failure; the ledger turns it into `canceled` when our cancel was accepted;
- IN_PROGRESS moves a submitted row forward; IN_QUEUE after IN_PROGRESS is fal putting the
  request back in its queue: not terminal, the row stays open;
- 404 (fal does not know the request) becomes failed with an error saying so, cost zero;
- a request still open past `max_open` is given up: the reconciler asks fal to cancel it
  (a queued request leaves fal's queue; a running one gets the signal) and, when fal
  accepts, records the cancel, so the row becomes `canceled` at cost zero, and a
  completion fal still sends later is billed as fal bills it. Only a definite answer
  ends the row: fal not knowing the request (404) makes it failed, cost zero; a cancel
  that gets no answer (fal unreachable, 5xx after retries) or any other error leaves the
  row open for the next pass (a $0 failure that fal later completes and bills would be a
  conflict); when fal answers that the request already finished, the next pass reads its
  outcome.
A fal call that fails transiently leaves the row as it is for the next pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Literal

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.fal_defaults import FAL_API_URL
from renderqueue_pipeline.fal_gateway import (
    FalError,
    FalGateway,
    FalNotFound,
    FalRequestError,
    FalUnavailable,
)
from renderqueue_pipeline.fal_platform import FalPlatformError
from renderqueue_pipeline.ledger import (
    CancelIntent,
    LedgerEvent,
    apply_waiting_events,
    mark_cancel_requested,
    mark_unknown_outcomes,
    record_cancel_intent,
    record_events,
    withdraw_cancel_intent,
)
from renderqueue_pipeline.ledger.core import DEFAULT_EVENT_RETENTION, EventKind
from renderqueue_pipeline.reconcile.adopt import (
    AdoptReport,
    adopt_fal_requests,
    duplicates_to_cancel,
)
from renderqueue_pipeline.settings import Settings

log = logging.getLogger("renderqueue.reconcile")

# What a caller that passes nothing gets: the settings' defaults, from their one
# definition (settings.py); entry points build the options with `from_settings`.
_DEFAULTS = Settings.model_fields

Verdict = Literal["event", "open", "fal_error", "result_expired"]


@dataclass(frozen=True)
class ReconcileOptions:
    """How far back to look, when to give up, and how hard to push fal."""

    min_age: timedelta = timedelta(minutes=_DEFAULTS["reconcile_min_age_minutes"].default)
    max_open: timedelta = timedelta(hours=_DEFAULTS["reconcile_max_open_hours"].default)
    result_window: timedelta = timedelta(
        minutes=_DEFAULTS["reconcile_result_window_minutes"].default
    )
    concurrency: int = _DEFAULTS["reconcile_concurrency"].default
    max_rows: int = _DEFAULTS["reconcile_max_rows"].default
    chunk: int = 500
    #: read fal's request list and adopt what it has: "auto" (when `platform_configured`),
    #: "on" or "off"
    adopt: str = _DEFAULTS["reconcile_adopt"].default
    adopt_lookback: timedelta = timedelta(
        minutes=_DEFAULTS["reconcile_adopt_lookback_minutes"].default
    )
    adopt_first_window: timedelta = timedelta(
        hours=_DEFAULTS["reconcile_adopt_window_hours"].default
    )
    #: events waiting longer than this for their row are marked expired
    event_retention: timedelta = DEFAULT_EVENT_RETENTION
    #: an admin key or a Platform API URL is configured: "auto" reads fal's request list
    platform_configured: bool = False
    #: how long fal keeps an adopted request's media (RENDERQUEUE_FAL_OBJECT_LIFETIME)
    object_lifetime: float | None = _DEFAULTS["fal_object_lifetime"].default

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.max_rows < 1 or self.chunk < 1:
            raise ValueError("max_rows and chunk must be >= 1")

    @classmethod
    def from_settings(cls, s: Settings, **overrides: Any) -> ReconcileOptions:
        """Options from RENDERQUEUE_RECONCILE_* (overrides win when not None); the entry
        points read the settings and pass them here."""

        options = cls(
            min_age=timedelta(minutes=s.reconcile_min_age_minutes),
            max_open=timedelta(hours=s.reconcile_max_open_hours),
            result_window=timedelta(minutes=s.reconcile_result_window_minutes),
            concurrency=s.reconcile_concurrency,
            max_rows=s.reconcile_max_rows,
            adopt=s.reconcile_adopt,
            adopt_lookback=timedelta(minutes=s.reconcile_adopt_lookback_minutes),
            adopt_first_window=timedelta(hours=s.reconcile_adopt_window_hours),
            event_retention=timedelta(days=s.event_retention_days),
            platform_configured=s.fal_admin_key is not None
            or s.fal_api_url.rstrip("/") != FAL_API_URL,
            object_lifetime=s.fal_object_lifetime,
        )
        return replace(options, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class ReconcileReport:
    """What one pass did; the run metadata and the CLI show exactly these figures."""

    examined: int = 0
    advanced: int = 0
    still_open: int = 0
    failed: int = 0
    results_fetched: int = 0
    completed: int = 0
    canceled: int = 0
    payloads_filled: int = 0
    not_found: int = 0
    past_limit: int = 0
    requeued: int = 0
    fal_errors: int = 0
    results_expired: int = 0
    waiting_events_applied: int = 0
    events_expired: int = 0
    unknown_outcomes: int = 0
    adoption: AdoptReport = field(default_factory=AdoptReport)
    seconds: float = 0.0
    ledger_write_seconds: float = 0.0
    fal_error_samples: list[str] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.examined / self.seconds if self.seconds > 0 else 0.0

    def figures(self) -> dict[str, int | float]:
        """The figures by name, in the order a reader wants them."""
        return {
            "rows_examined": self.examined,
            "rows_advanced": self.advanced,
            "still_open": self.still_open,
            "failed": self.failed,
            "results_fetched": self.results_fetched,
            "completed": self.completed,
            "canceled": self.canceled,
            "payloads_filled": self.payloads_filled,
            "not_found_at_fal": self.not_found,
            "open_past_limit": self.past_limit,
            "requeued_by_fal": self.requeued,
            "fal_errors": self.fal_errors,
            "results_expired": self.results_expired,
            "waiting_events_applied": self.waiting_events_applied,
            "events_expired": self.events_expired,
            "unknown_outcomes": self.unknown_outcomes,
            **self.adoption.figures(),
            "seconds": round(self.seconds, 3),
            "ledger_write_seconds": round(self.ledger_write_seconds, 3),
            "rows_per_second": round(self.rows_per_second, 1),
        }

    def markdown(self) -> str:
        """The figures as a markdown table (Dagster's run metadata, docs)."""
        lines = ["| figure | value |", "|---|---:|"]
        lines += [
            f"| {name.replace('_', ' ')} | {value} |" for name, value in self.figures().items()
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Row:
    request_id: str
    endpoint: str
    status: str
    past_limit: bool
    payload_missing: bool


@dataclass(frozen=True)
class _Observation:
    row: _Row
    verdict: Verdict
    event: LedgerEvent | None = None
    result_fetched: bool = False
    reason: str = ""  # not_found | past_limit | requeued | fal error text
    cancel_accepted: bool = False  # fal accepted our cancel: record it before the event


def _interval(delta: timedelta) -> str:
    return f"{delta.total_seconds()} seconds"


def pick_rows(conn: LedgerConnection, options: ReconcileOptions) -> list[_Row]:
    """Open rows older than min_age, then payload-less completions (up to max_rows)."""
    params = {
        "min_age": _interval(options.min_age),
        "max_open": _interval(options.max_open),
        "result_window": _interval(options.result_window),
        "limit": options.max_rows,
    }
    open_rows = conn.execute(q("reconcile_open_rows"), params).fetchall()
    params["limit"] = max(0, options.max_rows - len(open_rows))
    missing = (
        conn.execute(q("reconcile_payload_missing_rows"), params).fetchall()
        if params["limit"]
        else []
    )
    conn.commit()  # end the read transaction: the pass may take minutes
    rows = [
        _Row(r["request_id"], r["endpoint"], r["status"], bool(r["past_limit"]), False)
        for r in open_rows
    ]
    rows += [_Row(r["request_id"], r["endpoint"], r["status"], False, True) for r in missing]
    return rows


def _event(
    row: _Row, kind: EventKind, payload: Any = None, error: str | None = None
) -> LedgerEvent:
    return LedgerEvent(row.request_id, kind, payload, error, "reconcile")


async def observe(
    fal: FalGateway, row: _Row, options: ReconcileOptions, writer: _Writer | None = None
) -> _Observation:
    """Ask fal about one row and say what it means for the ledger.

    The only write is a give-up's cancel intent, through `writer`, before fal is asked.
    """
    try:
        status = await fal.status(row.endpoint, row.request_id)
    except FalNotFound:
        return _Observation(
            row,
            "event",
            _event(
                row,
                "failed",
                error=(
                    "fal does not know this request (HTTP 404 on status): it was never "
                    "queued or fal no longer keeps it; marked failed by the reconciler, "
                    "nothing billed"
                ),
            ),
            reason="not_found",
        )
    except FalError as exc:
        return _Observation(row, "fal_error", reason=str(exc))

    if status.done and status.error is None:
        return await _fetch_completed(fal, row)
    if status.done:  # fal finished it with an error: terminal whatever the error says
        return await _fetch_failed(fal, row, status.error, status.error_type)
    if row.payload_missing:  # cannot happen at fal (completed is final); leave it be
        return _Observation(row, "open")
    if row.past_limit:
        return await _give_up(fal, row, status.state, options, writer)
    if status.state == "in_progress" and row.status == "submitted":
        return _Observation(row, "event", _event(row, "in_progress"))
    if status.state == "queued" and row.status == "in_progress":
        return _Observation(row, "open", reason="requeued")  # fal re-queued it: not terminal
    return _Observation(row, "open")


async def _give_up(
    fal: FalGateway,
    row: _Row,
    state: str,
    options: ReconcileOptions,
    writer: _Writer | None = None,
) -> _Observation:
    """Open past `max_open`: ask fal to cancel it, then close the row at cost zero.

    The cancel intent is recorded first (fal's ERROR for the cancelled request can reach
    the receiver before fal's 202 reaches us); a definite refusal withdraws it.
    """
    hours = options.max_open.total_seconds() / 3600
    still = f"still {state.replace('_', ' ')} at fal more than {hours:g} h after submit"
    intent = await writer.record_cancel_intent(row.request_id) if writer else None
    try:
        answer = await fal.cancel(row.endpoint, row.request_id)
    except FalNotFound as exc:  # a definite answer: fal does not know it, nothing to bill
        if writer and intent:
            await writer.withdraw_cancel_intent(intent)
        error = (
            f"{still}; given up by the reconciler, and fal does not know it when asked to "
            f"cancel ({exc}); nothing billed"
        )
        return _Observation(row, "event", _event(row, "failed", error=error), reason="past_limit")
    except FalError as exc:  # no definite answer (unreachable, 5xx, refused): ask next pass
        if writer and intent and isinstance(exc, FalRequestError):  # fal said no
            await writer.withdraw_cancel_intent(intent)
        return _Observation(row, "fal_error", reason=str(exc))
    if answer == "already_completed":  # it finished meanwhile: the next pass reads how
        if writer and intent:
            await writer.withdraw_cancel_intent(intent)
        return _Observation(row, "open")
    error = (
        f"{still}; given up by the reconciler, which asked fal to cancel it (accepted); "
        "nothing billed unless fal finishes it anyway"
    )
    return _Observation(
        row,
        "event",
        _event(row, "failed", error=error),
        reason="past_limit",
        cancel_accepted=True,
    )


async def _fetch_completed(fal: FalGateway, row: _Row) -> _Observation:
    try:
        payload = await fal.fetch_result(row.endpoint, row.request_id)
    except FalNotFound:
        if row.payload_missing:
            return _Observation(row, "result_expired")
        # finished (and billed) but fal no longer keeps the result: complete it; the
        # estimate stands since the output is unknown
        error = "completed at fal; the result was no longer available to the reconciler"
        return _Observation(row, "event", _event(row, "completed", error=error))
    except FalUnavailable as exc:
        return _Observation(row, "fal_error", reason=str(exc))
    except FalRequestError as exc:  # fal answered the result with an error: it failed
        return _Observation(
            row,
            "event",
            _event(row, "failed", _error_payload(exc), str(exc)),
            result_fetched=True,
        )
    return _Observation(row, "event", _event(row, "completed", payload), result_fetched=True)


async def _fetch_failed(
    fal: FalGateway, row: _Row, error: str | None, error_type: str | None
) -> _Observation:
    """A terminal error: fetch the result's error body for its detail when fal has it."""
    payload: Any = {"error_type": error_type} if error_type else None
    fetched = False
    try:
        await fal.fetch_result(row.endpoint, row.request_id)
    except FalRequestError as exc:
        payload, fetched = _error_payload(exc), True
    except FalError:
        pass  # the status already said it failed; the detail is a nicety
    text = f"fal: {error}" if error else "fal: the request ended with an error"
    return _Observation(row, "event", _event(row, "failed", payload, text), result_fetched=fetched)


def _error_payload(exc: FalRequestError) -> dict[str, Any]:
    payload: dict[str, Any] = {"detail": exc.detail}
    if exc.error_type:
        payload["error_type"] = exc.error_type
    payload["status_code"] = exc.status_code
    return payload


class _Writer:
    """Records events in chunks through the ledger's one writer, off the event loop."""

    def __init__(self, conn: LedgerConnection, chunk: int) -> None:
        self.conn = conn
        self.chunk = chunk
        self.pending: list[LedgerEvent] = []
        self.outcomes: dict[str, str] = {}
        self.seconds = 0.0
        self._lock = asyncio.Lock()

    async def add(self, event: LedgerEvent) -> None:
        self.pending.append(event)
        if len(self.pending) >= self.chunk:
            await self.flush()

    async def record_cancel_intent(self, request_id: str) -> CancelIntent | None:
        """Our cancel, recorded before fal is asked (the events that follow may beat it)."""
        async with self._lock:
            return await asyncio.to_thread(record_cancel_intent, self.conn, request_id)

    async def withdraw_cancel_intent(self, intent: CancelIntent) -> None:
        """fal refused the cancel definitively: a later ERROR is a failure again."""
        async with self._lock:
            await asyncio.to_thread(withdraw_cancel_intent, self.conn, intent)

    async def mark_cancel_requested(self, request_id: str) -> None:
        """Record fal's acceptance of our cancel before the events that follow it."""
        await self.flush()
        async with self._lock:
            await asyncio.to_thread(mark_cancel_requested, self.conn, request_id)

    async def flush(self) -> None:
        async with self._lock:
            batch, self.pending = self.pending, []
            if batch:
                started = time.monotonic()
                outcomes = await asyncio.to_thread(record_events, self.conn, batch)
                self.seconds += time.monotonic() - started
                for event, outcome in zip(batch, outcomes, strict=True):
                    self.outcomes[event.request_id] = outcome


async def reconcile_rows(
    conn: LedgerConnection,
    fal: FalGateway,
    rows: list[_Row],
    options: ReconcileOptions,
    report: ReconcileReport,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Observe every row with `options.concurrency` workers and record what fal said."""
    writer = _Writer(conn, options.chunk)
    queue: asyncio.Queue[_Row] = asyncio.Queue()
    for row in rows:
        queue.put_nowait(row)
    verdicts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    done = 0

    async def worker() -> None:
        nonlocal done
        while True:
            try:
                row = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            seen = await observe(fal, row, options, writer)
            verdicts[seen.verdict] += 1
            report.results_fetched += seen.result_fetched
            if seen.reason in ("not_found", "past_limit", "requeued"):
                reasons[seen.reason] += 1
            if seen.verdict == "fal_error" and len(report.fal_error_samples) < 5:
                report.fal_error_samples.append(seen.reason)
            if seen.cancel_accepted:
                await writer.mark_cancel_requested(row.request_id)
            if seen.event is not None:
                await writer.add(seen.event)
            done += 1
            if progress:
                progress(done, len(rows))

    workers = min(options.concurrency, len(rows))
    await asyncio.gather(*(worker() for _ in range(workers)))
    await writer.flush()
    report.ledger_write_seconds = writer.seconds

    report.fal_errors = verdicts["fal_error"]
    report.results_expired = verdicts["result_expired"]
    report.not_found = reasons["not_found"]
    report.past_limit = reasons["past_limit"]
    report.requeued = reasons["requeued"]
    _count_outcomes(conn, rows, writer.outcomes, report)


def _count_outcomes(
    conn: LedgerConnection,
    rows: list[_Row],
    outcomes: dict[str, str],
    report: ReconcileReport,
) -> None:
    """Advanced = rows an event of this pass changed; their states now, from the ledger."""
    changed = [rid for rid, outcome in outcomes.items() if outcome == "applied"]
    report.advanced = len(changed)
    states = {
        r["request_id"]: r
        for r in conn.execute(
            q("reconcile_row_states"), {"request_ids": [r.request_id for r in rows]}
        )
    }
    conn.commit()
    for rid in changed:
        state = states.get(rid)
        if state is None:
            continue
        if state["status"] == "failed":
            report.failed += 1
        elif state["status"] == "canceled":
            report.canceled += 1
        elif state["status"] == "completed":
            report.completed += 1
    missing = [r.request_id for r in rows if r.payload_missing]
    report.payloads_filled = sum(
        1 for rid in missing if rid in outcomes and states.get(rid, {}).get("has_output")
    )
    report.still_open = sum(
        1 for r in states.values() if r["status"] in ("submitted", "in_progress")
    )


def _adoption_wanted(options: ReconcileOptions) -> str | None:
    """None when fal's request list should be read; otherwise why not."""
    if options.adopt == "off":
        return "RENDERQUEUE_RECONCILE_ADOPT=off"
    if options.adopt == "on":
        return None
    if not options.platform_configured:
        return "no FAL_ADMIN_KEY and no RENDERQUEUE_FAL_API_URL: fal's request list not read"
    return None


def adopt_step(
    conn: LedgerConnection,
    options: ReconcileOptions,
    platform_factory: Callable[[], Any],
    *,
    now: Any = None,
) -> AdoptReport:
    """Read fal's request list and adopt (step 2 of a pass); never fails the pass."""

    skipped = _adoption_wanted(options)
    if skipped is not None:
        return AdoptReport(skipped=skipped)
    try:
        with platform_factory() as platform:
            return adopt_fal_requests(
                conn,
                platform,
                lookback=options.adopt_lookback,
                first_window=options.adopt_first_window,
                now=now,
                object_lifetime=options.object_lifetime,
            )
    except FalPlatformError as exc:
        log.warning("reconcile: fal's request list could not be read: %s", exc)
        return AdoptReport(skipped=f"fal's request list could not be read: {exc}")


async def cancel_duplicates(conn: LedgerConnection, fal: FalGateway, report: AdoptReport) -> None:
    """Ask fal to cancel second requests of an item that are still open (fal may bill
    them; a queued one leaves the queue). Accepted: recorded on the row, so its ERROR
    outcome becomes `canceled` at cost zero; a completion is billed as usual."""
    rows = await asyncio.to_thread(duplicates_to_cancel, conn)
    for row in rows:
        try:
            answer = await fal.cancel(row["endpoint"], row["request_id"])
        except FalError as exc:
            log.warning("cancel of duplicate %s failed: %s", row["request_id"], exc)
            continue
        if answer == "cancellation_requested":
            await asyncio.to_thread(mark_cancel_requested, conn, row["request_id"])
            report.duplicates_cancel_requested += 1


def reconcile(
    conn: LedgerConnection,
    options: ReconcileOptions,
    *,
    gateway_factory: Callable[[int], FalGateway],
    platform_factory: Callable[[], Any],
    progress: Callable[[int, int], None] | None = None,
) -> ReconcileReport:
    """One reconcile pass on `conn`; returns what it did (see the module doc).

    `gateway_factory(concurrency)` makes the gateway to fal's queue API;
    `platform_factory` makes the Platform API client whose request list is read when
    adoption is wanted (see `options.adopt`). Entry points build both from the settings.
    """
    report = ReconcileReport()
    started = time.monotonic()

    applied = apply_waiting_events(conn, retention=options.event_retention)
    report.waiting_events_applied = sum(
        n for outcome, n in applied.items() if outcome not in ("waiting", "expired", "error")
    )
    report.events_expired = applied["expired"]
    report.adoption = adopt_step(conn, options, platform_factory)
    report.unknown_outcomes = len(mark_unknown_outcomes(conn, _interval(options.min_age)))

    rows = pick_rows(conn, options)
    report.examined = len(rows)
    cancel = report.adoption.skipped is None
    if rows or cancel:

        async def run() -> None:
            async with gateway_factory(options.concurrency) as fal:
                if cancel:
                    await cancel_duplicates(conn, fal, report.adoption)
                if rows:
                    await reconcile_rows(conn, fal, rows, options, report, progress)

        asyncio.run(run())
    report.seconds = time.monotonic() - started
    log.info("reconcile: %s", report.figures())
    return report
