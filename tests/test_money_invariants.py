"""The ledger's money invariants, checked after every step of a stateful property test.

A hypothesis `RuleBasedStateMachine` drives the product's public operations in any order:
single submits with and without idempotency keys (and two concurrent calls with one key),
batch submits and cancels, crashes between intent and fal and between fal and record,
fal's webhooks through the receiver (duplicated, reordered, early before the row, late
after a month closed), reconcile passes, fal's billing events on any day (split over two
days, stamped before the row), billing ingest and reconciliation split at random days,
report refreshes and finalizations, and an injected clock (`rq_now()`,
`sql/schema/00_clock.sql`) that crosses month ends.

Real parts: the embedded Postgres (a database of this module's own, so its clock setting
touches no other test), the fal simulator through the real fal-client, its Platform API for
billing, the webhook receiver's ASGI app fed the simulator's signed deliveries.

The six invariants are written once, below, one function each; docs/ledger.md ("Money
invariants") lists them with where each is enforced. Examples: RENDERQUEUE_INVARIANT_EXAMPLES
(default 8, `make test`; `make invariants` runs 80), steps per example:
RENDERQUEUE_INVARIANT_STEPS (default 14). RENDERQUEUE_INVARIANTS=1,3 checks only those
(to see each invariant's own minimal failing example).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import ssl
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from batch_helpers import submit_file
from conftest import LEDGER_TABLES, patched_settings
from fal_sim_plugin import _fast_defaults
from hypothesis import HealthCheck, Verbosity, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from ledger_helpers import fal_from_env
from psycopg import sql
from psycopg.rows import dict_row
from spend_helpers import ADMIN_KEY, SPEND_TABLES
from starlette.testclient import TestClient

from renderqueue_pipeline.batch import (
    BatchOptions,
    asubmit_prompt,
    cancel_batch,
    set_budget,
)
from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.fal_gateway import FalGateway
from renderqueue_pipeline.fal_platform import FalPlatform
from renderqueue_pipeline.reconcile.core import ReconcileOptions, reconcile
from renderqueue_pipeline.reports.checks import report_matches_ledger
from renderqueue_pipeline.reports.months import finalizes_at
from renderqueue_pipeline.reports.spend import refresh_month
from renderqueue_pipeline.settings import load_settings
from renderqueue_pipeline.simulator.platform import BillingConfig, PlatformServer, attach
from renderqueue_pipeline.simulator.testing import RunningSimulator, WebhookSink, wait_until
from renderqueue_pipeline.simulator.testing import webhook_sink as running_webhook_sink
from renderqueue_pipeline.spend.billing import load_billing_events
from renderqueue_pipeline.spend.billing_check import apply_billed, check_billing, summarize
from renderqueue_pipeline.webhook.app import FAL_PATH, ReceiverConfig, create_app

EXAMPLES = int(os.environ.get("RENDERQUEUE_INVARIANT_EXAMPLES", "8"))
STEPS = int(os.environ.get("RENDERQUEUE_INVARIANT_STEPS", "14"))
VERBOSE = bool(os.environ.get("RENDERQUEUE_INVARIANT_VERBOSE"))
CHECKED = {int(n) for n in os.environ.get("RENDERQUEUE_INVARIANTS", "1,2,3,4,5,6").split(",") if n}

ENDPOINT = "bytedance/seedance-2.0/fast/text-to-video"
INPUTS = {"duration": "4", "resolution": "480p"}  # 4 s x 107,595 µ$/s = 430,380 µ$
BUDGET_USD = "1.00"  # the default: two requests fit in a user-month, the third does not
BUDGET_MICROS = 1_000_000
USERS = (7, 8)
#: user 7 has a budget of its own every month (`set_budget`): one request at a time
OWN_BUDGETS = {7: 500_000}
BUDGET_MONTHS = [dt.date(2026 + (10 + n) // 12, (10 + n) % 12 + 1, 1) for n in range(24)]
#: the clock starts 30 s before a month end; steps cross it, and the next one
START = dt.datetime(2027, 1, 31, 23, 59, 30, tzinfo=dt.UTC)
CLOCK_STEPS = {
    "1 minute": dt.timedelta(minutes=1),
    "11 minutes": dt.timedelta(minutes=11),
    "7 hours": dt.timedelta(hours=7),
    "1 day": dt.timedelta(days=1),
    "27 days": dt.timedelta(days=27),
}
#: how long after a crash an intent may stay `pending` before a reconcile pass must have
#: called it `unknown` (or adopted fal's request): the default 10 minutes plus a lease
LEASE = dt.timedelta(minutes=15)
#: simulator timings: slow enough that a cancel right after a batch finds requests queued
#: or running, fast enough that settling waits well under a second
SIM_TIMINGS = {"queue_delay": "0.1:0.4", "run_time": "0.2:0.4"}


class Crash(BaseException):
    """The process died at this seam: nothing after it runs (not an Exception, so no
    `except Exception` in the product catches it)."""


def month_of(moment: dt.datetime) -> dt.date:
    return moment.astimezone(dt.UTC).date().replace(day=1)


def next_month(month: dt.date) -> dt.date:
    return (month + dt.timedelta(days=32)).replace(day=1)


def month_start(month: dt.date) -> dt.datetime:
    return dt.datetime(month.year, month.month, 1, tzinfo=dt.UTC)


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


# -- what the invariants read: the ledger's rows and fal's ground truth, one snapshot -------


@dataclass
class Call:
    """One submit the test made: whose, with which key, when (the model clock)."""

    token: str
    user_id: int
    key: str | None
    at: dt.datetime
    kind: str


@dataclass
class World:
    """Everything the invariants look at, read once after a step."""

    truth: list[dict[str, Any]]  # fal's requests (the simulator's ground truth)
    rows: dict[str, dict[str, Any]]  # generations by request id
    items: list[dict[str, Any]]  # batch_items
    calls: dict[str, Call]  # by prompt token
    reconciled_at: list[dt.datetime]  # model clock of each reconcile pass
    reports: list[dict[str, Any]]  # spend_report_months rows
    billing_checks: list[dict[str, Any]] = field(default_factory=list)

    def token(self, request: dict[str, Any]) -> str:
        return str(request["inputs"]["prompt"]).removeprefix("rq-inv ")

    def items_of(self, token: str) -> list[dict[str, Any]]:
        return [i for i in self.items if i["prompt"] == f"rq-inv {token}"]


def ledger_sums_by_user(conn: psycopg.Connection, month: dt.date) -> dict[int, dict[str, int]]:
    """The ledger's own figures of a month by user, in the report's columns (the test's
    definition, not the product's): a generation belongs to the UTC month of created_at."""
    rows = conn.execute(
        """
        select user_id, count(*) as generations,
               count(*) filter (where status = 'completed') as completed,
               count(*) filter (where status = 'failed') as failed,
               count(*) filter (where status = 'canceled') as canceled,
               count(*) filter (where status in ('submitted', 'in_progress')) as open,
               coalesce(sum(cost_micros) filter (where status = 'completed'), 0) as cost_micros,
               coalesce(sum(cost_micros) filter (where status in ('submitted', 'in_progress')),
                        0) as open_estimate_micros
        from generations
        where created_at >= %(start)s and created_at < %(end)s
        group by user_id
        """,
        {"start": month_start(month), "end": month_start(next_month(month))},
    ).fetchall()
    return {r["user_id"]: {k: int(v) for k, v in r.items() if k != "user_id"} for r in rows}


REPORT_COLUMNS = (
    "generations",
    "completed",
    "failed",
    "canceled",
    "open",
    "cost_micros",
    "open_estimate_micros",
)


# -- the six invariants, written once --------------------------------------------------------


def one_idempotency_key_at_most_one_request_at_fal(world: World) -> None:
    """1. A key is claimed once: fal never holds two requests for one idempotency key."""
    by_key: dict[str, list[str]] = defaultdict(list)
    for request in world.truth:
        call = world.calls.get(world.token(request))
        if call is not None and call.key is not None:
            by_key[call.key].append(request["request_id"])
    twice = {key: ids for key, ids in by_key.items() if len(ids) > 1}
    assert not twice, f"idempotency keys sent to fal more than once: {twice}"


def admission_never_exceeds_budget(world: World) -> None:
    """2. For every user-month (the UTC month the request reached fal), what fal holds costs
    at most the budget: spent (completed), in flight (open rows and unanswered intents at
    their estimates) and each admitted row; failed and canceled count 0. Costs never grow
    after admission (the test bills fal's exact figure), so a breach here is an admission
    that let spent + in flight + this row exceed the budget, or a send never admitted."""
    committed: dict[tuple[int, dt.date], int] = defaultdict(int)
    detail: dict[tuple[int, dt.date], list[str]] = defaultdict(list)
    for request in world.truth:
        token = world.token(request)
        call = world.calls.get(token)
        if call is None:
            continue
        row = world.rows.get(request["request_id"])
        if row is not None:
            month = month_of(row["created_at"])
            cost = 0 if row["status"] in ("failed", "canceled") else int(row["cost_micros"])
            user = row["user_id"]
        else:
            month = month_of(call.at)
            cost = max((int(i["estimate_micros"] or 0) for i in world.items_of(token)), default=0)
            user = call.user_id
        committed[(user, month)] += cost
        detail[(user, month)].append(f"{request['request_id'][:8]}:{call.kind}:{cost}")
    over = {
        f"user {u} {m:%Y-%m}": (total, OWN_BUDGETS.get(u, BUDGET_MICROS), detail[(u, m)])
        for (u, m), total in committed.items()
        if total > OWN_BUDGETS.get(u, BUDGET_MICROS)
    }
    assert not over, f"user-months past their budget at fal (total, budget, requests): {over}"


def every_request_at_fal_is_in_the_ledger_or_unknown(world: World) -> None:
    """3. Every request fal has is a generations row, or its intent is honestly marked
    `unknown` (still `pending` only until a reconcile pass after the sender's lease)."""
    missing = []
    for request in world.truth:
        token = world.token(request)
        call = world.calls.get(token)
        if call is None or request["request_id"] in world.rows:
            continue
        states = sorted({i["state"] for i in world.items_of(token)})
        if "unknown" in states:
            continue
        lease_passed = any(at >= call.at + LEASE for at in world.reconciled_at)
        if "pending" in states and not lease_passed:
            continue
        missing.append((request["request_id"], call.kind, states))
    assert not missing, f"requests at fal the ledger neither has nor calls unknown: {missing}"


def closed_month_report_equals_ledger_or_is_marked_changed(
    world: World, conn: psycopg.Connection, check: Callable[[dt.date], list[Any]]
) -> None:
    """4. A finalized month's report equals the ledger's sums, key by key; if the ledger
    changed since, the month is marked changed (`spend_report_changes`: more changes than
    its last rebuild saw, sql/functions/report_changes.sql) and its blocking checks fail. A
    check never passes on a differing report."""
    for report in world.reports:
        if report["state"] != "final":
            continue
        month = report["month"]
        reported = {
            r["user_id"]: {c: int(r[c]) for c in REPORT_COLUMNS}
            for r in conn.execute(
                "select * from spend_monthly_by_user where month = %s", (month,)
            ).fetchall()
        }
        ledger = ledger_sums_by_user(conn, month)
        if reported == ledger:
            continue
        findings = check(month)
        passed = [f.name for f in findings if f.passed]
        marked = conn.execute(
            "select changes > rebuilt_changes as dirty from spend_report_changes where month = %s",
            (month,),
        ).fetchone()
        changed = bool(marked and marked["dirty"])
        why = (
            f"final report of {month:%Y-%m} differs from the ledger (report {reported}, "
            f"ledger {ledger}); marked changed: {changed}; checks that passed: {passed}"
        )
        assert changed, why
        assert not passed, why


def fal_billed_total_counts_each_event_once(world: World) -> None:
    """5. fal's billed total for a month is the sum of its billing events, each once,
    whether the month was reconciled whole or split at any days."""
    wrong = [c for c in world.billing_checks if not c["expected"] == c["whole"] == c["split"]]
    assert not wrong, f"fal's billed total of a month is not its events' sum: {wrong}"


def failed_and_unbilled_canceled_rows_cost_nothing(world: World) -> None:
    """6. Failed rows, and canceled rows fal did not bill, cost 0; a row fal completed
    (cancelled too late) is not failed or canceled: it costs what fal billed (the row's
    billed figure when fal's bill was applied, else our figure for the output)."""
    truth = {r["request_id"]: r for r in world.truth}
    wrong = []
    for request_id, row in world.rows.items():
        fal = truth.get(request_id)
        if row["status"] in ("failed", "canceled"):
            if int(row["cost_micros"]) != 0:
                wrong.append((request_id, row["status"], row["cost_micros"], "not 0"))
            if fal is not None and fal["status"] == "completed":
                wrong.append((request_id, row["status"], row["cost_micros"], "fal billed it"))
        elif (
            row["cost_basis"] == "billed"
            and row["fal_billed_micros"] is not None
            and int(row["cost_micros"]) != int(row["fal_billed_micros"])
        ):
            wrong.append((request_id, "billed", row["cost_micros"], row["fal_billed_micros"]))
    assert not wrong, f"rows whose cost is not what fal billed: {wrong}"


# -- the machine's environment: one simulator, one database, one sink, per module -----------


@dataclass
class Env:
    url: str
    database: str
    admin_url: str
    sim: RunningSimulator
    sink: WebhookSink
    platform: PlatformServer
    billing: httpx.Client
    tmp: Path


@pytest.fixture(scope="module")
def env(
    make_database: Callable[[], str],
    admin_url: str,
    fal_simulator: RunningSimulator,
    platform_server: PlatformServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Env]:
    """A migrated database of this module's own (its clock is set per database), the
    session's simulator and Platform API (billing only what the test bills), a sink that
    records the simulator's signed webhooks for the test to deliver."""
    url = make_database()
    migrate(url)
    database = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    engine = fal_simulator.server.app.state.engine
    listeners = list(engine.finish_listeners), list(engine.submit_listeners)
    attach(engine, platform_server.book)  # fal's request list lists what the queue accepts
    # fal bills what the test says, on the day it says (not on completion, by wall clock)
    engine.finish_listeners[:] = [
        f for f in listeners[0] if getattr(f, "__self__", None) is not platform_server.book
    ]
    billing = httpx.Client(
        base_url=platform_server.base_url,
        verify=ssl.create_default_context(cafile=fal_simulator.ca_bundle),
    )

    with (
        running_webhook_sink() as sink,
        patched_settings(
            RENDERQUEUE_WEBHOOK_URL=sink.url,
            RENDERQUEUE_DEFAULT_MONTHLY_BUDGET_USD=BUDGET_USD,
            DATABASE_URL=url,
        ),
    ):
        try:
            yield Env(
                url,
                database,
                admin_url,
                fal_simulator,
                sink,
                platform_server,
                billing,
                tmp_path_factory.mktemp("invariants"),
            )
        finally:
            billing.close()
            engine.finish_listeners[:], engine.submit_listeners[:] = listeners


ENV: Env | None = None


class MoneyMachine(RuleBasedStateMachine):
    """The ledger's public operations in any order; the invariants after every step."""

    def __init__(self) -> None:
        super().__init__()
        assert ENV is not None
        self.env = ENV
        self.clock = START
        self.calls: dict[str, Call] = {}
        self.keys: list[tuple[int, str]] = []
        self.batches: list[int] = []
        self.reconciled_at: list[dt.datetime] = []
        self.billing_checks: list[dict[str, Any]] = []
        self.billed: set[str] = set()  # fal bills a request once (in one or two events)
        self.billed_months: set[dt.date] = set()
        self.forwarded: set[int] = set()  # indexes into sink.received already delivered
        self.receiver: TestClient | None = None
        self.gateways = 0

    # -- set-up and plumbing ---------------------------------------------------------------

    @initialize()
    def fresh_ledger_and_fal(self) -> None:
        env = self.env
        with psycopg.connect(env.url, autocommit=True) as conn:
            conn.execute("set lock_timeout = '60s'")
            tables = ", ".join(LEDGER_TABLES + SPEND_TABLES)
            conn.execute(f"truncate {tables} restart identity cascade")
        if not env.sim.running:
            env.sim.start()
        env.sim.control.reset(seed=0, **{**_fast_defaults(), **SIM_TIMINGS})
        env.platform.book.reset(BillingConfig(admin_key=ADMIN_KEY))

        with self.connect() as conn:
            for user_id, limit in OWN_BUDGETS.items():
                for month in BUDGET_MONTHS:
                    set_budget(conn, user_id, limit, month)
        with env.sink.lock:
            env.sink.received.clear()
        self.set_clock(START)

    def teardown(self) -> None:
        if self.receiver is not None:
            self.receiver.__exit__(None, None, None)
            self.receiver = None

    def set_clock(self, moment: dt.datetime) -> None:
        """Every new ledger session sees `rq_now() = moment`; the receiver is restarted so
        its connections see it too."""
        self.clock = moment
        with psycopg.connect(self.env.admin_url, autocommit=True) as conn:
            conn.execute(
                f'alter database "{self.env.database}" set renderqueue.now = '
                + sql.quote(iso(moment))
            )
        if self.receiver is not None:
            self.receiver.__exit__(None, None, None)
        config = ReceiverConfig(
            self.env.url, self.env.sim.jwks_url, max_wait=0.0, user_ids=frozenset({"sim-user"})
        )
        self.receiver = TestClient(create_app(config))
        self.receiver.__enter__()

    def platform(self) -> Any:
        """fal's Platform API client (billing events, the request list)."""

        return FalPlatform(ADMIN_KEY, base_url=self.env.platform.api_url, retry_initial=0.01)

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.env.url, autocommit=True, row_factory=dict_row)

    def new_call(self, user_id: int, key: str | None, kind: str) -> Call:
        token = uuid.uuid4().hex[:12]
        call = Call(token, user_id, key, self.clock, kind)
        self.calls[token] = call
        return call

    def submit(self, call: Call, gateway_wrapper: Callable[[Any], Any] | None = None) -> str:
        """`asubmit_prompt` as the product backend calls it, through a real gateway (which a
        crash rule wraps); returns what happened."""

        async def go() -> str:
            async with FalGateway.from_settings(load_settings(), max_concurrency=2) as fal:
                gateway = gateway_wrapper(fal) if gateway_wrapper else fal
                return await asubmit_prompt(
                    call.user_id,
                    ENDPOINT,
                    f"rq-inv {call.token}",
                    INPUTS,
                    idempotency_key=call.key,
                    ledger_url=self.env.url,
                    gateway=gateway,
                )

        try:
            return "sent " + asyncio.run(go())[:8]
        except Crash:
            return "crashed"
        except Exception as exc:  # noqa: BLE001 - refusals are outcomes; the invariants judge them
            return f"{type(exc).__name__}: {exc}"

    def deliver(self, webhook: Any) -> int:
        assert self.receiver is not None
        headers = {k: v for k, v in webhook.headers.items() if k.startswith("x-fal-")}
        headers["content-type"] = "application/json"
        return self.receiver.post(FAL_PATH, content=webhook.body, headers=headers).status_code

    def settle(self) -> None:
        """Wait until fal finished every request and the sink holds its webhook."""
        truth = self.env.sim.control.ground_truth()
        for request in truth:
            if request["status"] not in ("completed", "failed", "canceled"):
                self.env.sim.control.wait_finished(request["request_id"], timeout=30)
        wanted = {r["request_id"] for r in truth}

        def arrived() -> bool:
            with self.env.sink.lock:
                got = {w.headers.get("x-fal-webhook-request-id") for w in self.env.sink.received}
            return wanted <= got

        wait_until(arrived, timeout=30)

    # -- rules: submits --------------------------------------------------------------------

    @rule(user=st.sampled_from(USERS), keyed=st.booleans(), retry=st.booleans())
    def submit_one(self, user: int, keyed: bool, retry: bool) -> None:
        """The product backend's submit; `retry` repeats an earlier key (same inputs)."""
        if retry and self.keys:
            user, key = self.keys[-1]
            earlier = next(c for c in self.calls.values() if c.key == key)
            outcome = self.submit(Call(earlier.token, user, key, self.clock, "retry"))
        else:
            key = f"key-{uuid.uuid4().hex[:8]}" if keyed else None
            if key:
                self.keys.append((user, key))
            outcome = self.submit(self.new_call(user, key, "single"))
        _note(f"submit user {user}: {outcome}")

    @rule(user=st.sampled_from(USERS))
    def submit_twice_at_once_with_one_key(self, user: int) -> None:
        """Two callers with the same key at once while fal takes its time to answer."""
        key = f"key-{uuid.uuid4().hex[:8]}"
        self.keys.append((user, key))
        call = self.new_call(user, key, "concurrent")
        self.env.sim.control.set_faults(submit_latency=0.5)
        outcomes: list[str] = []
        try:
            threads = [
                threading.Thread(target=lambda: outcomes.append(self.submit(call)))
                for _ in range(2)
            ]
            for t in threads:
                t.start()
                time.sleep(0.1)
            for t in threads:
                t.join(60)
        finally:
            self.env.sim.control.set_faults(submit_latency=0)
        _note(f"concurrent submits user {user}: {outcomes}")

    @rule(user=st.sampled_from(USERS), rows=st.integers(1, 3))
    def submit_a_batch(self, user: int, rows: int) -> None:

        calls = [self.new_call(user, None, "batch") for _ in range(rows)]
        path = self.env.tmp / f"batch-{uuid.uuid4().hex[:8]}.csv"
        path.write_text("prompt\n" + "".join(f"rq-inv {c.token}\n" for c in calls))
        try:
            result = submit_file(
                str(path),
                BatchOptions(
                    default_user_id=user,
                    default_endpoint=ENDPOINT,
                    default_inputs=INPUTS,
                    concurrency=2,
                ),
                ledger_url=self.env.url,
            )
            self.batches.append(result.report.batch_id)
            _note(f"batch of {rows} for user {user}: {result.stats}")
        except Exception as exc:  # noqa: BLE001 - refusals are outcomes; the invariants judge them
            _note(f"batch of {rows} for user {user}: {type(exc).__name__}: {exc}")

    @rule(user=st.sampled_from(USERS), keyed=st.booleans())
    def crash_between_intent_and_fal(self, user: int, keyed: bool) -> None:
        class Dies:
            def __init__(self, fal: Any) -> None:
                self.fal = fal

            async def submit(self, endpoint: str, inputs: dict, **kw: Any) -> Any:
                raise Crash

        key = f"key-{uuid.uuid4().hex[:8]}" if keyed else None
        if key:
            self.keys.append((user, key))
        outcome = self.submit(self.new_call(user, key, "crash-before"), Dies)
        _note(f"crash before fal, user {user}: {outcome}")

    @rule(user=st.sampled_from(USERS), keyed=st.booleans())
    def crash_between_fal_and_record(self, user: int, keyed: bool) -> None:
        class SendsThenDies:
            def __init__(self, fal: Any) -> None:
                self.fal = fal

            async def submit(self, endpoint: str, inputs: dict, **kw: Any) -> Any:
                await self.fal.submit(endpoint, inputs, **kw)
                raise Crash

        key = f"key-{uuid.uuid4().hex[:8]}" if keyed else None
        if key:
            self.keys.append((user, key))
        call = self.new_call(user, key, "crash-after")
        _note(f"crash after fal, user {user}: {self.submit(call, SendsThenDies)}")

    @rule(user=st.sampled_from(USERS))
    def webhook_arrives_before_the_row(self, user: int) -> None:
        """fal finishes and its webhook is recorded before the submit writes the row."""
        machine = self

        class Early:
            def __init__(self, fal: Any) -> None:
                self.fal = fal

            async def submit(self, endpoint: str, inputs: dict, **kw: Any) -> Any:
                sent = await self.fal.submit(endpoint, inputs, **kw)
                await asyncio.to_thread(machine.deliver_now, sent.request_id)
                return sent

        _note(
            f"early webhook, user {user}: {self.submit(self.new_call(user, None, 'early'), Early)}"
        )

    def deliver_now(self, request_id: str) -> None:
        self.env.sim.control.wait_finished(request_id, timeout=30)

        def found() -> list[int]:
            with self.env.sink.lock:
                return [
                    n
                    for n, w in enumerate(self.env.sink.received)
                    if w.headers.get("x-fal-webhook-request-id") == request_id
                ]

        indexes = wait_until(found, timeout=30)
        for n in indexes:
            self.forwarded.add(n)
            self.deliver(self.env.sink.received[n])

    # -- rules: fal's side and the pipeline ------------------------------------------------

    @rule(order=st.sampled_from(["in order", "reversed"]), duplicate=st.booleans())
    def deliver_webhooks(self, order: str, duplicate: bool) -> None:
        """fal's webhooks so far, reaching the receiver in some order, maybe twice."""
        self.settle()
        with self.env.sink.lock:
            pending = [
                (n, w) for n, w in enumerate(self.env.sink.received) if n not in self.forwarded
            ]
        if order == "reversed":
            pending.reverse()
        answers = []
        for n, webhook in pending + (pending if duplicate else []):
            self.forwarded.add(n)
            answers.append(self.deliver(webhook))
        _note(f"delivered {len(pending)} webhooks {order}, duplicate {duplicate}: {answers}")

    @rule(batch=st.integers(0, 5))
    def cancel_a_batch(self, batch: int) -> None:

        if not self.batches:
            return
        batch_id = self.batches[batch % len(self.batches)]
        try:
            result = cancel_batch(
                batch_id,
                ledger_url=self.env.url,
                gateway_factory=lambda n: FalGateway.from_settings(
                    load_settings(), max_concurrency=n
                ),
            )
            _note(f"cancel batch {batch_id}: {result.summary()}")
        except Exception as exc:  # noqa: BLE001 - refusals are outcomes; the invariants judge them
            _note(f"cancel batch {batch_id}: {type(exc).__name__}: {exc}")

    @rule()
    def reconcile_pass(self) -> None:
        self.reconcile()

    def reconcile(self) -> None:

        with self.connect() as conn:
            report = reconcile(
                conn,
                ReconcileOptions(concurrency=4, adopt="on"),
                gateway_factory=fal_from_env().gateway,
                platform_factory=self.platform,
            )
        self.reconciled_at.append(self.clock)
        figures = {k: v for k, v in report.figures().items() if v and k != "seconds"}
        _note(f"reconcile at {iso(self.clock)}: {figures}")

    @rule(step=st.sampled_from(sorted(CLOCK_STEPS)))
    def clock_moves(self, step: str) -> None:
        """Time passes with the schedules running: a reconcile pass (every 5 minutes), the
        hourly refresh of this month, and last month's finalization (a rebuild) once its
        grace period ended during the step."""

        before = self.clock
        self.set_clock(before + CLOCK_STEPS[step])
        _note(f"clock +{step} -> {iso(self.clock)}")
        if CLOCK_STEPS[step] >= dt.timedelta(minutes=5):
            self.reconcile()
        if CLOCK_STEPS[step] >= dt.timedelta(hours=1):
            self.refresh(month_of(self.clock), rebuild=False)
        last = month_of(month_start(month_of(self.clock)) - dt.timedelta(days=1))
        if before < finalizes_at(last) <= self.clock:
            self.refresh(last, rebuild=True)

    @rule(
        pick=st.integers(0, 50),
        offset=st.sampled_from([-60, 1, 86_400, 2 * 86_400]),
        split=st.booleans(),
    )
    def fal_bills_a_request(self, pick: int, offset: int, split: bool) -> None:
        """fal bills one completed request (once) at its price, stamped `offset` seconds from when
        it reached fal (a minute before: across midnight when sent just after it), whole or
        split in two events two days apart."""
        self.settle()
        done = sorted(
            (
                r
                for r in self.env.sim.control.ground_truth()
                if r["status"] == "completed" and r["request_id"] not in self.billed
            ),
            key=lambda r: r["request_id"],
        )
        if not done:
            return
        request = done[pick % len(done)]
        with self.connect() as conn:
            row = conn.execute(
                "select created_at from generations where request_id = %s",
                (request["request_id"],),
            ).fetchone()
        call = self.calls[request["inputs"]["prompt"].removeprefix("rq-inv ")]
        base = row["created_at"] if row else call.at
        nanos = 430_380 * 1000
        parts = [nanos // 2, nanos - nanos // 2] if split else [nanos]
        events = [
            {
                "request_id": request["request_id"],
                "endpoint_id": ENDPOINT,
                "timestamp": iso(base + dt.timedelta(seconds=offset, days=2 * n)),
                "output_units": request["billed_seconds"] / len(parts),
                "unit_price": 0.107595,
                "cost_estimate_nano_usd": part,
                # listed from now on (wall clock), whatever day it is stamped with
                "visible_at": iso(dt.datetime.now(dt.UTC)),
            }
            for n, part in enumerate(parts)
        ]
        self.env.billing.post(
            "/_sim/billing/events", json={"billing_events": events}
        ).raise_for_status()
        self.billed.add(request["request_id"])
        self.billed_months |= {month_of(dt.datetime.fromisoformat(e["timestamp"])) for e in events}
        _note(f"fal bills {request['request_id'][:8]}: {[e['timestamp'] for e in events]}")

    @rule(which=st.integers(0, 5), cuts=st.sets(st.integers(2, 28), max_size=4))
    def ingest_and_reconcile_billing(self, which: int, cuts: set[int]) -> None:
        """Load fal's billing events around a month (this one, or one fal billed in), apply
        fal's figures, and reconcile the month whole and split at the given days."""

        months = sorted(self.billed_months | {month_of(self.clock)})
        month = months[which % len(months)]
        start, end = month_start(month), month_start(next_month(month))
        with self.platform() as platform, self.connect() as conn:
            load_billing_events(
                conn, platform, start - dt.timedelta(days=3), end + dt.timedelta(days=34)
            )
            apply_billed(conn, start, end)

            def fal_total() -> int:
                found = summarize(conn, start, end, largest=0)
                return sum(o.fal_micros for o in found.outcomes.values())

            check_billing(conn, start, end, now=self.clock)
            whole = fal_total()
            bounds = [start, *(start + dt.timedelta(days=d - 1) for d in sorted(cuts)), end]
            for a, b in itertools.pairwise(bounds):
                if a < b:
                    check_billing(conn, a, b, now=self.clock)
            split = fal_total()
            expected = self.expected_fal_total(conn, month)
        check = {"month": f"{month:%Y-%m}", "expected": expected, "whole": whole, "split": split}
        check["cuts"] = sorted(cuts)
        self.billing_checks.append(check)
        _note(f"billing reconciled: {check}")

    def expected_fal_total(self, conn: psycopg.Connection, month: dt.date) -> int:
        """Each loaded event once: every event of a request the ledger has belongs to its
        row's month (matched by request id, whatever day fal stamped it); an event of a
        request the ledger never recorded belongs to the month fal billed it in."""
        rows = conn.execute(
            """
            select e.request_id, e.cost_nano_usd, e.billed_at, g.created_at
            from fal_billing_events e left join generations g using (request_id)
            """
        ).fetchall()
        nanos: dict[str, int] = defaultdict(int)
        for r in rows:
            if month_of(r["created_at"] or r["billed_at"]) == month:
                nanos[r["request_id"]] += int(r["cost_nano_usd"])
        return sum(n // 1000 for n in nanos.values())  # whole micro-dollars by construction

    @rule(which=st.sampled_from(["this", "last"]), rebuild=st.booleans())
    def refresh_or_finalize_report(self, which: str, rebuild: bool) -> None:
        """The hourly refresh (this month) or the finalization (last month, from 06:00 on
        the 1st: a rebuild), as the reports' schedules run them."""

        month = month_of(self.clock)
        if which == "last":
            month = month_of(month_start(month) - dt.timedelta(days=1))
        self.refresh(month, rebuild)

    def refresh(self, month: dt.date, rebuild: bool) -> None:

        with self.connect() as conn:
            try:
                report = refresh_month(conn, month, now=self.clock, rebuild=rebuild)
                _note(f"report {month:%Y-%m}: {report.state}, {report.cost_micros} µ$")
            except Exception as exc:  # noqa: BLE001
                _note(f"report {month:%Y-%m}: {type(exc).__name__}: {exc}")

    # -- the invariants, after every step ---------------------------------------------------

    def world(self, conn: psycopg.Connection) -> World:
        rows = {
            r["request_id"]: r
            for r in conn.execute(
                "select request_id, user_id, status::text as status, cost_micros, cost_basis, "
                "fal_billed_micros, created_at from generations"
            ).fetchall()
        }
        items = conn.execute(
            "select id, state, estimate_micros, user_id, inputs->>'prompt' as prompt "
            "from batch_items"
        ).fetchall()
        reports = [
            {**r["m"], "month": dt.date.fromisoformat(r["m"]["month"])}
            for r in conn.execute("select to_jsonb(m) as m from spend_report_months m")
        ]
        return World(
            truth=self.env.sim.control.ground_truth(),
            rows=rows,
            items=items,
            calls=self.calls,
            reconciled_at=self.reconciled_at,
            reports=reports,
            billing_checks=self.billing_checks,
        )

    @invariant()
    def money_invariants_hold(self) -> None:

        with self.connect() as conn:
            world = self.world(conn)

            def checks(month: dt.date) -> list[Any]:
                return [report_matches_ledger(conn, month, by) for by in ("user", "endpoint")]

            if 1 in CHECKED:
                one_idempotency_key_at_most_one_request_at_fal(world)
            if 2 in CHECKED:
                admission_never_exceeds_budget(world)
            if 3 in CHECKED:
                every_request_at_fal_is_in_the_ledger_or_unknown(world)
            if 4 in CHECKED:
                closed_month_report_equals_ledger_or_is_marked_changed(world, conn, checks)
            if 5 in CHECKED:
                fal_billed_total_counts_each_event_once(world)
            if 6 in CHECKED:
                failed_and_unbilled_canceled_rows_cost_nothing(world)


def _note(text: str) -> None:

    if currently_in_test_context():
        note(text)
    if VERBOSE:
        print(text, flush=True)


# a failing run shrinks its counterexample for minutes: more than the suite's 300 s default
@pytest.mark.timeout(max(900, 30 * EXAMPLES))
@pytest.mark.slow
def test_money_invariants_hold_under_any_order_of_operations_across_month_ends(
    env: Env,
) -> None:
    global ENV
    ENV = env
    try:
        run_state_machine_as_test(
            MoneyMachine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                verbosity=Verbosity.verbose if VERBOSE else Verbosity.normal,
            ),
        )
    finally:
        ENV = None
