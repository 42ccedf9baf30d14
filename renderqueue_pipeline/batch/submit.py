"""Submit a prompts file as a batch: stream, validate, budget, fan out to fal, record.

    result = submit_batch_file("s3://prompts/inbox/week-48.csv", BatchOptions(...))

The run, step by step:
1. hash the file (sha256) and check it looks like its format; nothing is written yet;
2. find or create the batch by that hash: a renamed or re-uploaded copy of an ingested
   file finds its batch and submits nothing again;
3. hold the batch's session lock for the whole run (one submitting run per batch);
   intents a dead earlier run left pending become `unknown` (listed, resubmitted only
   with `resubmit_unknown`);
4. read rows in chunks; each chunk is one transaction that prices each row and records
   it as an intent claimed by this run (with a lease the run keeps refreshing) or a
   rejection;
5. `concurrency` workers send intents to fal at `priority` (low by default: a product's
   submit goes first), taking rows round-robin by user (`FairFeed`) and pausing while
   our requests waiting at fal for the endpoint pass `RENDERQUEUE_FAL_MAX_QUEUED`
   (`WaitingGate`, also each user's fair share of it across runs); they send intents
   to fal through the gateway (ledger rule 1: the
   intent is committed before the call); each item is admitted against its user's
   budget of the month it is sent in, many per statement, just before its call (the one
   admission: `claim_for_send`); a 429 halves the fan-out and backs off instead of
   failing the row; fal's answers are written by `finish_submission`;
6. progress goes to `log` every few seconds; the batch is `done` at the end.

Nothing is ever sent twice: a row whose item exists (submitted, rejected, unknown) is
skipped on a re-run, and an item's request id is written with its generation row.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, LiteralString

import psycopg
from psycopg.types.json import Jsonb

from renderqueue_pipeline.batch.budget import default_limit_from
from renderqueue_pipeline.batch.fal_answers import (
    fal_field,
    fal_reason,
    is_definite_rejection,
    is_rate_limited,
)
from renderqueue_pipeline.batch.feed import FAIR_LOOKAHEAD_ROWS, FairFeed, WaitingGate
from renderqueue_pipeline.batch.intents import BatchCap, decide_row, store_rejection
from renderqueue_pipeline.batch.limiter import AdaptiveLimit, shard_sizes
from renderqueue_pipeline.batch.report import BatchReport, batch_report
from renderqueue_pipeline.batch.rows import (
    PromptRow,
    Rejection,
    RowDefaults,
    parse_user_id,
    validate_row,
)
from renderqueue_pipeline.batch.send_marks import SendMarks
from renderqueue_pipeline.batch.source import (
    FileFacts,
    PromptReader,
    check_source,
    inspect_file,
    parse_prefixes,
)
from renderqueue_pipeline.db import LedgerConnection, one_row
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.db.server import database_url
from renderqueue_pipeline.errors import DatabaseUnavailable, RenderqueueError
from renderqueue_pipeline.fal_gateway import (
    FalAuthError,
    FalSubmitter,
    RequestIdentity,
    SubmitResult,
)
from renderqueue_pipeline.fal_platform import FalPlatformError
from renderqueue_pipeline.ledger import (
    Intent,
    finish_submission,
    lease_interval,
    refresh_leases,
    validate_request,
)
from renderqueue_pipeline.reconcile.adopt import AdoptReport, adopt_entries
from renderqueue_pipeline.redact import redact, redact_error
from renderqueue_pipeline.settings import Settings

MAX_CONCURRENCY = 256
#: How long one row may keep meeting 429s before it is recorded as refused by fal.
RATE_LIMIT_PATIENCE_S = 600.0
#: A batch in one of these states has been ingested: the same content again submits nothing.
FINISHED = ("done", "canceled")
PRIORITIES = ("low", "normal")
AUTH_STOP_REASON = (
    "fal refused the key (HTTP 401/403): check FAL_KEY; the rows not yet sent were left "
    "unsent and the next run with a working key sends them"
)


@dataclass(frozen=True)
class SubmitOptions:
    """What the environment decides for every submitting run (not per batch: that is
    `BatchOptions`). Entry points build it with `from_settings`; no field has a default
    here, so the defaults live once, in the Settings fields."""

    #: where a prompts file may come from: the inbox and RENDERQUEUE_PROMPT_SOURCES
    prompt_sources: tuple[str, ...]
    #: the fan-out pauses while this many requests wait at fal for one endpoint (0: no bound)
    max_queued: int
    #: RENDERQUEUE_SUBMIT_LEASE_SECONDS: a run's claim on its items
    lease_seconds: float
    #: the default monthly budget in micro-dollars (None: none)
    default_limit_micros: int | None
    #: how far back fal's request list is read for `resubmit_unknown`
    adopt_window: dt.timedelta
    #: how long fal keeps an adopted request's media (RENDERQUEUE_FAL_OBJECT_LIFETIME)
    object_lifetime: float | None

    @classmethod
    def from_settings(cls, settings: Settings) -> SubmitOptions:
        """The options `settings` hold (the entry points read them and pass them here)."""
        return cls(
            prompt_sources=(settings.prompts, *parse_prefixes(settings.prompt_sources)),
            max_queued=settings.fal_max_queued,
            lease_seconds=settings.submit_lease_seconds,
            default_limit_micros=default_limit_from(settings),
            adopt_window=dt.timedelta(hours=settings.reconcile_adopt_window_hours),
            object_lifetime=settings.fal_object_lifetime,
        )


class BatchConfigError(RenderqueueError, ValueError):
    """A batch setting cannot be used; names the setting."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {reason}")


class BatchStopped(RenderqueueError):
    """The run stopped before the end of the file (the reason says why)."""


@dataclass(frozen=True)
class BatchOptions:
    """How to submit a file; every field is also a launchpad setting of `submit_batch`."""

    default_user_id: int | None = None
    default_endpoint: str | None = None
    default_inputs: Mapping[str, Any] = field(default_factory=dict)
    max_cost_micros: int | None = None
    concurrency: int = 16
    resubmit_unknown: bool = False
    content_version: str = ""
    progress_seconds: float = 5.0
    chunk_rows: int = 256
    priority: Literal["low", "normal"] = "low"

    def checked(self) -> BatchOptions:
        """Self, after checking each setting (BatchConfigError names the bad one)."""
        if self.priority not in PRIORITIES:
            raise BatchConfigError(
                "priority", f"expected one of {', '.join(PRIORITIES)}, got {self.priority!r}"
            )
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int):
            raise BatchConfigError("concurrency", f"expected an integer, got {self.concurrency!r}")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise BatchConfigError(
                "concurrency", f"must be between 1 and {MAX_CONCURRENCY}, got {self.concurrency}"
            )
        if self.default_user_id is not None:
            try:
                parse_user_id(self.default_user_id)
            except ValueError as exc:
                raise BatchConfigError("default_user_id", str(exc)) from None
        if self.default_endpoint is not None and (
            not isinstance(self.default_endpoint, str) or "/" not in self.default_endpoint
        ):
            raise BatchConfigError(
                "default_endpoint",
                f"expected an endpoint id like owner/app/path, got {self.default_endpoint!r}",
            )
        if not isinstance(self.default_inputs, Mapping):
            raise BatchConfigError(
                "default_inputs", f"expected a mapping, got {type(self.default_inputs).__name__}"
            )
        if self.max_cost_micros is not None and self.max_cost_micros < 0:
            raise BatchConfigError("max_cost_usd", "must not be negative")
        return self


@dataclass
class RunStats:
    """What this run did (the batch's totals come from the database)."""

    started: float = field(default_factory=time.monotonic)
    read: int = 0
    skipped_existing: int = 0
    submitted: int = 0
    rejected: int = 0
    over_budget: int = 0
    refused_by_fal: int = 0
    unknown: int = 0
    orphaned: int = 0
    resubmitted_unknown: int = 0
    rate_limited: int = 0
    lowest_concurrency: int = 0
    #: sends that waited for our requests at fal to fall under RENDERQUEUE_FAL_MAX_QUEUED
    waited_for_fal_queue: int = 0
    finished: float | None = None

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def decided(self) -> int:
        return (
            self.submitted + self.rejected + self.over_budget + self.refused_by_fal + self.unknown
        )


@dataclass(frozen=True)
class BatchResult:
    """A finished run: the batch as stored, and what this run did."""

    report: BatchReport
    stats: RunStats
    duplicate: bool = False

    @property
    def batch_id(self) -> int:
        return self.report.batch_id

    @property
    def submit_rate(self) -> float:
        return self.stats.submitted / self.stats.elapsed if self.stats.elapsed > 0 else 0.0


Log = Callable[[str], None]


@dataclass(frozen=True)
class _NotSent:
    """An item the admission did not let through: over budget (reason), or not ours (None)."""

    reason: str | None


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class _Run:
    """One submitting run of one batch (all state of the fan-out lives here)."""

    def __init__(
        self,
        url: str,
        ledger_url: str,
        options: BatchOptions,
        facts: FileFacts,
        batch_id: int,
        log: Log,
        gateway_factory: Callable[[int], FalSubmitter],
        submit_options: SubmitOptions,
    ) -> None:
        self.url = url
        self.submit_options = submit_options
        self.ledger_url = ledger_url
        self.options = options
        self.facts = facts
        self.batch_id = batch_id
        self.log = log
        self.gateway_factory = gateway_factory
        self.stats = RunStats()
        self.limit = AdaptiveLimit(options.concurrency)
        self.stop_reason: str | None = None
        self.unsent: list[int] = []
        self.fatal: BaseException | None = None
        self.marks: SendMarks
        self.gate: WaitingGate
        self.total_hint = facts.rows_estimate
        # this run's identity on the items it claims; its lease is refreshed while it runs
        self.claimer = f"run:{batch_id}:{uuid.uuid4().hex[:16]}"
        self.lease_seconds = submit_options.lease_seconds
        #: unknown items fal's request list shows it never received (resubmit_unknown)
        self.resend_unknown: set[int] = set()

    # -- producer: rows -> intents (in a worker thread, its own connection) ----------

    def _chunks(
        self, reader: PromptReader, existing: set[int]
    ) -> Iterator[list[tuple[int, dict[str, Any]]]]:
        chunk: list[tuple[int, dict[str, Any]]] = []
        for line_no, raw in reader:
            if line_no in existing:
                self.stats.skipped_existing += 1
                continue
            chunk.append((line_no, raw))
            if len(chunk) >= self.options.chunk_rows:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _write_chunk(
        self,
        conn: LedgerConnection,
        rows: list[tuple[int, dict[str, Any]]],
        cap: BatchCap,
    ) -> list[Intent]:
        defaults = RowDefaults(
            self.options.default_user_id,
            self.options.default_endpoint,
            self.options.default_inputs,
        )
        checked = [validate_row(line_no, raw, defaults) for line_no, raw in rows]
        try:
            return self._record(conn, checked, cap, careful=False)
        except psycopg.errors.OperationalError:
            raise
        except psycopg.Error:
            # a row the database refused: redo the chunk row by row, each in a savepoint
            return self._record(conn, checked, cap, careful=True)

    def _record(
        self,
        conn: LedgerConnection,
        checked: list[PromptRow | Rejection],
        cap: BatchCap,
        *,
        careful: bool,
    ) -> list[Intent]:
        intents: list[Intent] = []
        cap_before = cap.used_micros
        counts = {"rejected": 0, "over_budget": 0}
        try:
            with conn.transaction():
                for row in checked:
                    if isinstance(row, Rejection):
                        decided: Intent | Rejection = row
                    elif careful:
                        try:
                            with conn.transaction():
                                decided = self._decide(conn, row, cap)
                        except psycopg.errors.OperationalError:
                            raise
                        except psycopg.Error as exc:
                            decided = Rejection(
                                row.line_no,
                                "(row)",
                                redact(f"the ledger refused it: {exc}".strip()),
                                "invalid",
                                row.user_id,
                                row.endpoint,
                            )
                    else:
                        decided = self._decide(conn, row, cap)
                    if isinstance(decided, Rejection):
                        store_rejection(conn, self.batch_id, decided)
                        counts["over_budget" if decided.kind == "over_budget" else "rejected"] += 1
                    elif decided.state == "pending":
                        intents.append(decided)
        except BaseException:
            cap.used_micros = cap_before
            raise
        self.stats.read += len(checked)
        self.stats.rejected += counts["rejected"]
        self.stats.over_budget += counts["over_budget"]
        return intents

    def _decide(self, conn: LedgerConnection, row: PromptRow, cap: BatchCap) -> Intent | Rejection:
        return decide_row(
            conn,
            row,
            batch_id=self.batch_id,
            cap=cap,
            claimer=self.claimer,
            lease_seconds=self.lease_seconds,
        )

    # -- the run ----------------------------------------------------------------------

    async def run(self, reader: PromptReader) -> None:

        queue = FairFeed(max(FAIR_LOOKAHEAD_ROWS, self.options.concurrency * 4))
        results: asyncio.Queue[tuple[Intent, Any] | None] = asyncio.Queue()
        intents_conn = await asyncio.to_thread(connect, self.ledger_url, autocommit=True)
        results_conn = await asyncio.to_thread(connect, self.ledger_url, autocommit=True)
        marks_conn = await asyncio.to_thread(connect, self.ledger_url, autocommit=True)
        gate_conn = await asyncio.to_thread(connect, self.ledger_url, autocommit=True)
        default_limit = self.submit_options.default_limit_micros
        self.marks = SendMarks(marks_conn, self.claimer, self.lease_seconds, default_limit)
        self.gate = WaitingGate(gate_conn, self.submit_options.max_queued)
        try:
            async with contextlib.AsyncExitStack() as stack:
                sizes = shard_sizes(self.options.concurrency)
                gateways = [
                    await stack.enter_async_context(self.gateway_factory(size)) for size in sizes
                ]
                workers = [
                    asyncio.create_task(self._worker(gateways[i % len(sizes)], queue, results))
                    for i in range(self.options.concurrency)
                ]
                recorder = asyncio.create_task(self._recorder(results_conn, results))
                ticker = asyncio.create_task(self._ticker())
                heartbeat = asyncio.create_task(self._heartbeat(marks_conn))
                watcher = asyncio.create_task(self._watch_cancel(gate_conn))
                try:
                    await self._produce(intents_conn, reader, queue)
                finally:
                    await queue.close()
                    await asyncio.gather(*workers)
                    await results.put(None)
                    await recorder
                    for task in (ticker, heartbeat, watcher):
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                    if self.unsent:
                        await asyncio.to_thread(self._forget_unsent, intents_conn)
            if self.fatal is not None:
                raise self.fatal
        finally:
            self.stats.finished = time.monotonic()
            self.stats.rate_limited = self.limit.rate_limited
            self.stats.lowest_concurrency = self.limit.lowest
            self.stats.waited_for_fal_queue = self.gate.pauses
            for conn in (intents_conn, results_conn, marks_conn, gate_conn):
                await asyncio.to_thread(conn.close)

    async def _feed(self, conn: LedgerConnection, queue: FairFeed, intent: Intent) -> None:
        """Queue an intent for the fan-out; while the feed stays full, watch for a cancel."""
        while self.stop_reason is not None or not await queue.put(intent, timeout=1.0):
            if self.stop_reason is not None:
                self.unsent.append(intent.item_id)
                return
            if await asyncio.to_thread(_batch_status, conn, self.batch_id) == "canceled":
                self.stop_reason = "the batch was canceled"

    async def _produce(self, conn: LedgerConnection, reader: PromptReader, queue: FairFeed) -> None:
        existing = await asyncio.to_thread(_line_numbers, conn, self.batch_id)
        if self.total_hint is not None:
            self.total_hint = max(self.total_hint - len(existing), 0)
        unsent = await asyncio.to_thread(
            self._load_intents, conn, q("unsent_pending_items"), reopen=False
        )
        if unsent:
            self.log(f"sending {len(unsent)} items a stopped run recorded but never sent")
        if self.options.resubmit_unknown:
            unknown = await asyncio.to_thread(
                self._load_intents,
                conn,
                q("unknown_items_to_resubmit"),
                reopen=True,
                only=self.resend_unknown,
            )
            self.stats.resubmitted_unknown = len(unknown)
            if unknown:
                self.log(f"resubmitting {len(unknown)} items whose outcome was unknown")
            unsent += unknown
        if self.total_hint is not None:
            self.total_hint += len(unsent)
        for intent in unsent:
            await self._feed(conn, queue, intent)
        cap_row = await asyncio.to_thread(
            lambda: one_row(conn.execute(q("batch_cost_so_far"), {"batch_id": self.batch_id}))
        )
        cap = BatchCap(self.options.max_cost_micros, int(cap_row["micros"]))
        chunks = self._chunks(reader, existing)
        while self.stop_reason is None:
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                return
            if await asyncio.to_thread(_batch_status, conn, self.batch_id) == "canceled":
                self.stop_reason = "the batch was canceled"
                return
            for intent in await asyncio.to_thread(self._write_chunk, conn, chunk, cap):
                await self._feed(conn, queue, intent)

    def _load_intents(
        self,
        conn: LedgerConnection,
        sql: LiteralString,
        *,
        reopen: bool,
        only: set[int] | None = None,
    ) -> list[Intent]:
        """Stored items as intents to send, claimed by this run and priced again.

        `only`: the item ids that may be sent (None: all). Like every intent, each is
        admitted against its user's budget only when it is sent (`claim_for_send`): a
        re-run or a resubmit never sends anything unadmitted.
        """

        intents = []
        claim = {"claimer": self.claimer, "lease": lease_interval(self.lease_seconds)}
        for item in conn.execute(sql, {"batch_id": self.batch_id}).fetchall():
            if only is not None and item["id"] not in only:
                continue
            with conn.transaction():
                if (
                    reopen
                    and not conn.execute(
                        q("reopen_unknown_item"), {"item_id": item["id"], **claim}
                    ).fetchone()
                ):
                    continue
                estimate = validate_request(
                    conn, item["endpoint"], item["inputs"], item["user_id"], row=item["line_no"]
                )
                if not conn.execute(
                    q("claim_unsent_item"),
                    {"item_id": item["id"], "estimate_micros": estimate.cost_micros, **claim},
                ).fetchone():
                    continue
            intents.append(
                Intent(
                    item_id=item["id"],
                    state="pending",
                    request_id=None,
                    user_id=item["user_id"],
                    endpoint=item["endpoint"],
                    inputs=item["inputs"],
                    estimate=estimate,
                    claimer=self.claimer,
                )
            )
        return intents

    async def _watch_cancel(self, conn: LedgerConnection) -> None:
        """Stop sending once the batch is canceled (the fan-out may be rows behind the file)."""
        while self.stop_reason is None:
            await asyncio.sleep(1.0)
            with contextlib.suppress(psycopg.Error):
                if await asyncio.to_thread(_batch_status, conn, self.batch_id) == "canceled":
                    self.stop_reason = self.stop_reason or "the batch was canceled"

    async def _heartbeat(self, conn: LedgerConnection) -> None:
        """Keep this run's claims alive (also while fal throttles it with 429s)."""
        while True:
            await asyncio.sleep(self.lease_seconds / 4)
            try:
                await asyncio.to_thread(refresh_leases, conn, self.claimer, self.lease_seconds)
            except psycopg.Error as exc:  # a missed beat only shortens the lease
                self.log(f"could not refresh this run's lease: {exc}")

    async def _worker(self, gateway: FalSubmitter, queue: FairFeed, results: asyncio.Queue) -> None:

        while True:
            intent = await queue.get()
            if intent is None:
                return
            if self.stop_reason is not None:
                self.unsent.append(intent.item_id)
                continue
            await self.gate.enter(
                intent.endpoint, intent.user_id, lambda: self.stop_reason is not None
            )
            if self.stop_reason is not None:
                self.gate.leave(intent.endpoint, intent.user_id)
                self.unsent.append(intent.item_id)
                continue
            try:
                outcome = await self._send(gateway, intent)
            except Exception as exc:  # noqa: BLE001
                self.gate.leave(intent.endpoint, intent.user_id)
                if self.fatal is None:
                    self.fatal, self.stop_reason = exc, redact_error(exc)
                    self.log(f"stopping: {self.stop_reason}")
                self.unsent.append(intent.item_id)
                continue
            if isinstance(outcome, _NotSent):
                self.gate.leave(intent.endpoint, intent.user_id)
                if outcome.reason is not None:
                    self.stats.over_budget += 1
                else:
                    self.log(f"item {intent.item_id} is no longer this run's to send; skipped")
                continue
            if isinstance(outcome, FalAuthError):
                # the key's fault, not the row's: fal enqueued nothing; the row stays unsent
                self.gate.leave(intent.endpoint, intent.user_id)
                await asyncio.to_thread(self._unmark_sent, intent.item_id)
                self.unsent.append(intent.item_id)
                if self.stop_reason is None:
                    self.stop_reason = AUTH_STOP_REASON
                    self.log(f"stopping: {self.stop_reason}")
                continue
            await results.put((intent, outcome))

    async def _send(
        self, gateway: FalSubmitter, intent: Intent
    ) -> SubmitResult | _NotSent | Exception:
        """fal's SubmitResult, or fal's exception; 429s are waited out, not returned.

        The item is marked sent (committed) before its first call; an exception from the
        ledger itself propagates.
        """
        first_try = time.monotonic()
        marked = False
        while True:
            await self.limit.acquire()
            try:
                if not marked:
                    claim = await self.marks.mark(intent.item_id)
                    if claim is None or not claim[0]:
                        await self.limit.release()
                        return _NotSent(None if claim is None else claim[1])
                    marked = True
            except BaseException:
                await self.limit.release()
                raise
            try:
                submitted = await gateway.submit(
                    intent.endpoint,
                    dict(intent.inputs),
                    identity=RequestIdentity(intent.item_id, intent.user_id, self.batch_id),
                    priority=self.options.priority,
                )
            except Exception as exc:  # noqa: BLE001
                limited = is_rate_limited(exc)
                await self.limit.release(rate_limited=limited)
                if limited and time.monotonic() - first_try < RATE_LIMIT_PATIENCE_S:
                    if (
                        self.limit.rate_limited in (1, 10, 100)
                        or self.limit.rate_limited % 1000 == 0
                    ):
                        self.log(
                            f"fal answered 429: slowing down to {self.limit.limit} in flight "
                            f"({self.limit.rate_limited} rate-limited calls so far)"
                        )
                    continue
                return exc
            await self.limit.release()
            return submitted  # the SubmitResult: request id and fal_expires_at

    async def _recorder(self, conn: LedgerConnection, results: asyncio.Queue) -> None:
        done = False
        while not done:
            first = await results.get()
            if first is None:
                return
            group = [first]
            while not results.empty() and len(group) < 64:
                item = results.get_nowait()
                if item is None:
                    done = True
                    break
                group.append(item)
            await asyncio.to_thread(self._record_outcomes, conn, group)

    def _record_outcomes(self, conn: LedgerConnection, group: list[tuple[Intent, Any]]) -> None:
        """fal's answers through the ledger's `finish_submission`, one commit per group.

        Each answer is its own savepoint inside the group's transaction (the ledger's
        blocks nest), so one bad answer cannot spoil the others, and a burst of answers
        costs one commit instead of one each.
        """
        counts = {"submitted": 0, "refused_by_fal": 0, "unknown": 0}
        try:
            with conn.transaction():
                for intent, outcome in group:
                    counts[self._record_outcome(conn, intent, outcome)] += 1
        finally:
            for intent, _ in group:
                self.gate.leave(intent.endpoint, intent.user_id)
        self.stats.submitted += counts["submitted"]
        self.stats.refused_by_fal += counts["refused_by_fal"]
        self.stats.unknown += counts["unknown"]

    def _record_outcome(self, conn: LedgerConnection, intent: Intent, outcome: Any) -> str:
        try:
            finish_submission(conn, intent, outcome, is_definite_rejection)
            return "submitted"
        except Exception as exc:  # noqa: BLE001 - classified: a refusal is recorded, else re-raised
            if is_definite_rejection(exc):
                conn.execute(
                    q("label_rejected_item"),
                    {
                        "item_id": intent.item_id,
                        "kind": "fal",
                        "field": fal_field(exc),
                        "reason": redact(fal_reason(exc)),
                    },
                )
                return "refused_by_fal"
            conn.execute(
                q("mark_item_unknown"),
                {"item_id": intent.item_id, "reason": redact(f"outcome unknown: {exc}")},
            )
            return "unknown"

    def _unmark_sent(self, item_id: int) -> None:
        """fal refused the key: the call enqueued nothing, so the item was never sent."""
        self.marks.conn.execute(q("unmark_item_sent"), {"item_id": item_id})  # thread-safe

    def _forget_unsent(self, conn: LedgerConnection) -> None:
        with conn.transaction():
            conn.execute(q("forget_unsent_items"), {"item_ids": self.unsent})

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.options.progress_seconds)
            self.log(self.progress_line())

    def progress_line(self) -> str:
        s = self.stats
        elapsed = max(s.elapsed, 1e-9)
        rate = s.decided / elapsed
        total = self.total_hint
        if total:
            done = min(s.decided, total)
            eta = _eta((total - done) / rate) if rate > 0 else "?"
            head = f"{s.decided:,}/~{total:,} rows ({done / total:.0%})"
        else:
            head, eta = f"{s.decided:,} rows", "?"
        return (
            f"batch {self.batch_id}: {head}, {s.submitted:,} submitted, "
            f"{s.rejected + s.refused_by_fal:,} rejected, {s.over_budget:,} over budget, "
            f"{s.unknown:,} unknown; {rate:,.0f} rows/s, {self.limit.limit} in flight max, "
            f"ETA {eta}"
        )


def _line_numbers(conn: LedgerConnection, batch_id: int) -> set[int]:
    return {r["line_no"] for r in conn.execute(q("batch_line_numbers"), {"batch_id": batch_id})}


def _batch_status(conn: LedgerConnection, batch_id: int) -> str | None:
    row = conn.execute(q("batch_status"), {"batch_id": batch_id}).fetchone()
    return row["status"] if row else None


#: fal's clock and ours may differ: fal's list is read from this long before the first send
CLOCK_MARGIN = dt.timedelta(minutes=5)


def unknown_items_fal_never_had(
    conn: LedgerConnection,
    batch_id: int,
    platform_factory: Callable[[], Any],
    log: Log,
    submit_options: SubmitOptions,
    *,
    now: dt.datetime | None = None,
) -> set[int]:
    """The unknown items of the batch that fal's request list shows it never received.

    Reads fal's list (`submit_options.adopt_window` back at most) for the
    items' endpoints and adopts what it finds there (those items become `submitted`);
    an item sent before that window stays unknown: the list cannot prove fal never got
    it. Raises BatchConfigError when the list cannot be read: resending blind could pay
    for a video twice.
    """

    def unknown() -> list[dict[str, Any]]:
        with conn.transaction():
            return conn.execute(q("unknown_items_sent_since"), {"batch_id": batch_id}).fetchall()

    items = unknown()
    if not items:
        return set()
    now = now or dt.datetime.now(dt.UTC)
    horizon = now - submit_options.adopt_window
    report = AdoptReport()
    try:
        with platform_factory() as platform:
            for endpoint in sorted({i["endpoint"] for i in items}):
                sent = [i["sent_at"] or i["created_at"] for i in items if i["endpoint"] == endpoint]
                start = max(min(sent) - CLOCK_MARGIN, horizon)
                entries = platform.requests_by_endpoint(endpoint, start, now)
                adopt_entries(
                    conn,
                    entries,
                    endpoint,
                    report,
                    object_lifetime=submit_options.object_lifetime,
                )
    except FalPlatformError as exc:
        raise BatchConfigError(
            "resubmit_unknown",
            f"fal's request list could not be read ({exc}); nothing resent: an item fal "
            "already has would be paid for twice",
        ) from None
    if report.adopted:
        log(f"{report.adopted} unknown items were at fal after all: adopted, not resent")
    left = unknown()
    resend = {i["id"] for i in left if (i["sent_at"] or i["created_at"]) >= horizon}
    if len(resend) < len(left):
        log(
            f"{len(left) - len(resend)} unknown items were sent before fal's request list "
            "window: it cannot show fal never got them; left unknown"
        )
    return resend


def _open_batch(
    conn: LedgerConnection, facts: FileFacts, options: BatchOptions, source: str
) -> tuple[dict[str, Any], bool]:
    """The batch of this content: (row, created). Never two batches for one sha256."""
    with conn.transaction():
        created = conn.execute(
            q("insert_batch"),
            {
                "source": source,
                "content_version": options.content_version,
                "sha256": facts.sha256,
                "size": facts.size,
                "endpoint": options.default_endpoint,
                "default_user_id": options.default_user_id,
                "default_inputs": Jsonb(dict(options.default_inputs)),
                "max_cost_micros": options.max_cost_micros,
                "rows_estimate": facts.rows_estimate,
            },
        ).fetchone()
        if created is not None:
            return created, True
        return one_row(conn.execute(q("batch_by_sha256"), {"sha256": facts.sha256})), False


def submit_batch_file(
    url: str,
    options: BatchOptions | None = None,
    *,
    submit_options: SubmitOptions,
    gateway_factory: Callable[[int], FalSubmitter],
    platform_factory: Callable[[], Any],
    ledger_url: str | None = None,
    log: Log = lambda line: None,
    allow_local: bool = True,
    allowed_prefixes: Sequence[str] = (),
) -> BatchResult:
    """Submit every good row of the prompts file at `url` (an allowed fsspec URL) as one batch.

    `url` must lie under one of `submit_options.prompt_sources` (the prompts inbox and the
    RENDERQUEUE_PROMPT_SOURCES prefixes) or under
    one of `allowed_prefixes`; a local path is also allowed when `allow_local` (the CLI;
    never the launchpad). The file is fetched once into a local copy that is hashed,
    parsed and then read, so what is submitted is what was hashed.

    Raises PromptFileError when the source is not allowed or the file as a whole cannot
    be used (nothing written), BatchConfigError for a bad option (and for
    `resubmit_unknown` when fal's request list cannot be read: `platform_factory` makes
    its client), BatchStopped when fal refused the key. The
    same content ingested before (under any name), or being submitted by another run
    right now, submits nothing: the result says `duplicate`. Rejected rows are recorded
    and reported, never raised. A run that dies leaves its batch `failed` with the reason
    (redacted), never `open`.
    """

    def safe_log(line: str) -> None:
        log(redact(line))

    options = (options or BatchOptions()).checked()
    allowed = [*submit_options.prompt_sources, *allowed_prefixes]
    check_source(url, allowed, allow_local=allow_local)
    ledger_url = ledger_url or database_url()
    with tempfile.TemporaryFile(prefix="renderqueue-prompts-") as copy:
        facts = inspect_file(url, copy_to=copy)
        safe_log(
            f"{url}: {facts.format}, {facts.size:,} bytes, sha256 {facts.sha256[:12]}…"
            + (f", about {facts.rows_estimate:,} rows" if facts.rows_estimate is not None else "")
        )
        return _submit_copy(
            url,
            copy,
            facts,
            options,
            ledger_url,
            safe_log,
            gateway_factory,
            platform_factory,
            submit_options,
        )


def _mark_failed(conn: LedgerConnection, ledger_url: str, batch_id: int, reason: str) -> None:
    """Best effort: the batch is `failed` with `reason` (the next run reopens it anyway).

    The run's own connection may be what died, so a fresh one is tried second.
    """
    params = {"batch_id": batch_id, "status": "failed", "error": redact(reason)}
    try:
        with conn.transaction():
            conn.execute(q("finish_batch"), params)
        return
    except psycopg.Error:
        pass
    with (
        contextlib.suppress(psycopg.Error, DatabaseUnavailable),
        connect(ledger_url, autocommit=True) as fresh,
    ):
        fresh.execute(q("finish_batch"), params)


def _submit_copy(
    url: str,
    copy: Any,
    facts: FileFacts,
    options: BatchOptions,
    ledger_url: str,
    log: Log,
    gateway_factory: Callable[[int], FalSubmitter],
    platform_factory: Callable[[], Any],
    submit_options: SubmitOptions,
) -> BatchResult:
    """The rest of `submit_batch_file`, reading the rows from the local copy."""
    with (
        PromptReader(url, facts.format, stream=copy) as reader,
        connect(ledger_url, autocommit=True) as conn,
    ):
        batch, created = _open_batch(conn, facts, options, url)
        batch_id = batch["id"]
        if not created and batch["status"] in FINISHED and not options.resubmit_unknown:
            log(
                f"already ingested as batch {batch_id} from {batch['source']} "
                f"({batch['status']}); nothing submitted"
            )
            return BatchResult(batch_report(conn, batch_id), RunStats(), duplicate=True)
        if not one_row(conn.execute(q("try_lock_batch"), {"batch_id": batch_id}))["locked"]:
            log(
                f"batch {batch_id} ({batch['source']}) is being submitted by another run right "
                "now; nothing submitted by this one"
            )
            return BatchResult(batch_report(conn, batch_id), RunStats(), duplicate=True)
        try:
            with conn.transaction():
                orphaned = conn.execute(
                    q("orphaned_items_to_unknown"), {"batch_id": batch_id}
                ).fetchall()
            resend: set[int] = set()
            if options.resubmit_unknown:  # before anything changes: it may refuse
                resend = unknown_items_fal_never_had(
                    conn, batch_id, platform_factory, log, submit_options
                )
            with conn.transaction():
                if not created:
                    conn.execute(q("reopen_batch"), {"batch_id": batch_id})
            if orphaned:
                log(
                    f"{len(orphaned)} items of batch {batch_id} were left by a run that stopped "
                    "between intent and answer: marked unknown"
                )
            log(f"batch {batch_id}: " + ("created" if created else "resuming"))
            run = _Run(
                url,
                ledger_url,
                options,
                facts,
                batch_id,
                log,
                gateway_factory,
                submit_options,
            )
            run.stats.orphaned = len(orphaned)
            run.resend_unknown = resend
            failure: BaseException | None = None
            try:
                asyncio.run(run.run(reader))
            except BaseException as exc:  # noqa: BLE001
                failure = exc
            log(run.progress_line())
            if failure is not None:
                reason = (
                    str(failure)
                    if isinstance(failure, RenderqueueError)
                    else f"the run died: {redact_error(failure)}"
                )
                _mark_failed(conn, ledger_url, batch_id, reason)
                raise failure
            if run.stop_reason is not None:
                if _batch_status(conn, batch_id) != "canceled":
                    with conn.transaction():
                        conn.execute(
                            q("finish_batch"),
                            {"batch_id": batch_id, "status": "failed", "error": run.stop_reason},
                        )
                    raise BatchStopped(f"batch {batch_id} stopped: {run.stop_reason}")
            else:
                with conn.transaction():
                    conn.execute(
                        q("finish_batch"), {"batch_id": batch_id, "status": "done", "error": None}
                    )
            return BatchResult(batch_report(conn, batch_id), run.stats)
        finally:
            conn.execute(q("unlock_batch"), {"batch_id": batch_id})
