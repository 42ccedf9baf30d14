"""The simulator's state machine: requests, their timeline, outcomes and webhook deliveries.

Every decision about a request (queue delay, run time, failure, webhook faults,
re-queues, output) is drawn at submit time from an RNG seeded by `seed` and the
request's index, in a fixed order, so one seed gives the same story whatever the wall
clock does and whichever knobs change. Request ids stay random (uuid4) so that
restarting with the same seed never reuses an id a ledger already holds.

How a request can end, and what fal shows for it (docs/simulator.md, "Outcomes"):

- completed: the output (exactly fal's documented fields), billed.
- failed: the model's 422 body (result 422, ERROR webhook with the body as payload).
- timed out: `X-Fal-Request-Timeout` (start_timeout) passed before a runner picked the
  request up: result 504 with `X-Fal-Request-Timeout-Type: user`, not billed.
- canceled: a cancel removed it from the queue, or (a `cancel_stop_rate` share) the app
  stopped when signalled: result 499 `client_cancelled`, not billed. A running request
  is otherwise only signalled, finishes and is billed.

Under `concurrency_limit` (fal's account cap) a request whose queue delay has passed
still waits for a free slot; free slots go to `normal` priority before `low`, FIFO by
submit order inside each, and the request's whole timeline moves by that wait. A
request holds its slot from its start until it ends (re-queued attempts included).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import random
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from renderqueue_pipeline.simulator.config import SimConfig
from renderqueue_pipeline.simulator.keys import UrlSigner, WebhookSigner
from renderqueue_pipeline.simulator.models import (
    OutputFile,
    PlannedOutput,
    family_for,
    file_id_for,
    plan_output,
    validate_inputs,
)

log = logging.getLogger("renderqueue.simulator")

State = Literal["queued", "in_progress", "completed", "failed", "canceled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "canceled"})
Ending = Literal["ok", "model_error", "start_timeout", "cancelled"]

FAILURE_DETAIL = [
    {
        "loc": ["body", "prompt"],
        "msg": "The content could not be processed because it was flagged by a content checker.",
        "type": "content_policy_violation",
    }
]
#: What fal answers for a request that did not start within its X-Fal-Request-Timeout
#: (status code and header from fal-client's source; the body's words are unverified).
TIMEOUT_BODY = {"detail": "Request timed out before it started", "error_type": "request_timeout"}
#: A cancelled request: fal documents `client_cancelled` (499) as an error type; the
#: exact body and webhook of a cancelled request are not documented (unverified).
CANCELLED_BODY = {"detail": "Request cancelled", "error_type": "client_cancelled"}
HTTP_STATUS = {"model_error": 422, "start_timeout": 504, "cancelled": 499}


@dataclass
class Decisions:
    """What the fault model decided for one request (exposed as ground truth)."""

    queue_delay: float
    run_time: float
    submit_latency: float
    fail: bool
    payload_error: bool
    duplicate: bool
    duplicate_delay: float
    drop: bool
    out_of_order: bool
    out_of_order_delay: float
    early: bool
    webhook_delay: float
    stop_on_cancel: bool = False
    requeues: int = 0


@dataclass
class Attempt:
    """One runner attempt: [start, stop) on the monotonic clock, under one gateway id."""

    start: float
    stop: float
    gateway_request_id: str


@dataclass
class Lifecycle:
    """The request headers that shape what happens to it (all optional on fal)."""

    object_lifetime: float | None  # seconds the output files live; None = no expiry
    start_timeout: float | None = None
    priority: str = "normal"
    runner_hint: str | None = None
    store_io: bool = True


@dataclass
class CdnFile:
    """A file on the simulated CDN: public, stable URL, deleted at `expires_wall`."""

    path: str
    file: OutputFile
    created_wall: float
    expires_wall: float | None
    request_id: str | None = None
    deleted: bool = False

    def alive(self, now: float) -> bool:
        return not self.deleted and (self.expires_wall is None or now < self.expires_wall)


@dataclass
class SimRequest:
    """One submitted request and everything the simulator knows about it."""

    request_id: str
    gateway_request_id: str
    index: int
    endpoint: str
    app_path: str
    inputs: Any
    webhook_url: str | None
    base_url: str
    decisions: Decisions
    planned: PlannedOutput
    lifecycle: Lifecycle
    submitted_mono: float
    submitted_wall: float
    attempts: list[Attempt]
    end_mono: float
    sync: bool = False
    timeout_mono: float | None = None  # when start_timeout ends it (it never starts)
    validation_errors: list[dict[str, Any]] = field(default_factory=list)
    state: State = "queued"
    ending: Ending | None = None
    finished_wall: float | None = None
    started_wall: float | None = None
    cancel_requested: bool = False
    payloads_deleted: bool = False
    cdn_path: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    webhook_bytes: bytes | None = None
    #: X-Fal-Tags as sent (values exactly as on the wire)
    tags: dict[str, str] = field(default_factory=dict)
    #: waiting for a slot under the concurrency cap (its timeline is not fixed yet)
    awaiting_slot: bool = False
    #: when start_timeout ends a request still waiting for a slot
    slot_deadline: float | None = None
    slot_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def start_mono(self) -> float:
        return self.attempts[0].start

    @property
    def will_fail(self) -> bool:
        return self.decisions.fail or bool(self.validation_errors)

    def error_body(self) -> dict[str, Any]:
        if self.ending == "start_timeout":
            return dict(TIMEOUT_BODY)
        if self.ending == "cancelled":
            return dict(CANCELLED_BODY)
        return {"detail": self.validation_errors or FAILURE_DETAIL}

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.ending or "", 200)


@dataclass
class Delivery:
    """One webhook delivery attempt (or a decision not to send one)."""

    request_id: str
    gateway_request_id: str
    copy: int
    attempt: int
    at: float
    outcome: Literal["delivered", "failed", "dropped"]
    status_code: int | None = None
    error: str | None = None
    url: str | None = None
    status: str | None = None
    timestamp: str | None = None
    will_retry: bool = False

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _iso(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).isoformat().replace("+00:00", "Z")


def _url_token(request_id: str) -> str:
    """fal's file names look like `<21 url-safe chars>_output.mp4`; fixed per request."""
    rng = random.Random(f"token:{request_id}")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return "".join(rng.choice(alphabet) for _ in range(21))


class Engine:
    """All mutable simulator state; lives on the server's event loop only."""

    def __init__(self, config: SimConfig, signer: WebhookSigner, url_signer: UrlSigner) -> None:
        self.config = config
        self.signer = signer
        self.url_signer = url_signer
        self.requests: dict[str, SimRequest] = {}
        self.files: dict[str, CdnFile] = {}
        self.deliveries: list[Delivery] = []
        self.counter = 0
        self.api_calls = 0
        self.api_draws = 0  # restarts when the config changes: "set faults, then call" replays
        self.api_faults: dict[str, int] = _no_faults()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.http: httpx.AsyncClient | None = None
        # submit calls being answered now, and the most at one moment, since the last reset
        # (a call still answered from before a reset counts in its own epoch only)
        self.submits_in_flight = 0
        self.submits_in_flight_peak = 0
        self.epoch = 0
        # called with each request as it finishes (the Platform API simulator bills from it)
        self.finish_listeners: list[Callable[[SimRequest], None]] = []
        # called with each request as it is created (the Platform API's request list)
        self.submit_listeners: list[Callable[[SimRequest], None]] = []
        # the concurrency cap: requests waiting for a slot (submit order) and slot holders
        self.waiting: dict[str, SimRequest] = {}
        self.holding: set[str] = set()

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.http = httpx.AsyncClient(follow_redirects=False)

    async def stop(self) -> None:
        await self._cancel_tasks()
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    async def _cancel_tasks(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()

    async def reset(self, config: SimConfig) -> None:
        """Forget every request, file and delivery; start counting from zero under `config`."""
        await self._cancel_tasks()
        self.config = config
        self.requests.clear()
        self.waiting.clear()
        self.holding.clear()
        self.files.clear()
        self.deliveries.clear()
        self.counter = 0
        self.api_calls = 0
        self.api_draws = 0
        self.api_faults = _no_faults()
        self.epoch += 1
        self.submits_in_flight = 0
        self.submits_in_flight_peak = 0

    def update_config(self, config: SimConfig) -> None:
        """Apply new knobs to requests submitted from now on; API fault draws restart."""
        self.config = config
        self.api_draws = 0
        self._pump()  # a raised or removed cap frees slots now

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ----- API faults ------------------------------------------------------------------------

    def api_fault(self) -> str | None:
        """Decide whether this API call fails transiently (one RNG per call, by call index)."""
        self.api_calls += 1
        self.api_draws += 1
        cfg = self.config
        rates = (
            ("429", cfg.api_429_rate),
            ("503", cfg.api_503_rate),
            ("500", cfg.api_500_rate),
            ("502", cfg.api_502_rate),
            ("504", cfg.api_504_rate),
        )
        if not any(rate for _, rate in rates):
            return None
        u = random.Random(f"{cfg.seed}:api:{self.api_draws}").random()
        bound = 0.0
        for fault, rate in rates:
            bound += rate
            if u < bound:
                self.api_faults[fault] += 1
                return fault
        return None

    # ----- submit ----------------------------------------------------------------------------

    def validation_stage(self, endpoint: str) -> Literal["submit", "run"]:
        """Where this endpoint checks its inputs (its own rule unless a knob overrides it)."""
        if self.config.validation != "endpoint":
            return self.config.validation
        return family_for(endpoint).validates_at

    def create(
        self,
        endpoint: str,
        app_path: str,
        inputs: Any,
        webhook_url: str | None,
        base_url: str,
        *,
        lifecycle: Lifecycle | None = None,
        sync: bool = False,
        tags: dict[str, str] | None = None,
    ) -> SimRequest:
        """Register a request and draw all its decisions (fixed draw order: keep it stable)."""
        cfg = self.config
        lifecycle = lifecycle or Lifecycle(cfg.cdn_default_lifetime)
        index = self.counter
        self.counter += 1
        rng = random.Random(f"{cfg.seed}:req:{index}")
        decisions = Decisions(
            queue_delay=cfg.dist("queue_delay").sample(rng),
            run_time=cfg.dist("run_time").sample(rng),
            submit_latency=cfg.dist("submit_latency").sample(rng),
            fail=rng.random() < cfg.failure_rate,
            payload_error=rng.random() < cfg.payload_error_rate,
            duplicate=rng.random() < cfg.webhook_duplicate_rate,
            duplicate_delay=cfg.dist("webhook_duplicate_delay").sample(rng),
            drop=rng.random() < cfg.webhook_drop_rate,
            out_of_order=rng.random() < cfg.webhook_out_of_order_rate,
            out_of_order_delay=cfg.dist("webhook_out_of_order_delay").sample(rng),
            early=rng.random() < cfg.webhook_early_rate,
            webhook_delay=cfg.dist("webhook_delay").sample(rng),
        )
        request_id = str(uuid.uuid4())
        planned = plan_output(
            endpoint,
            inputs if isinstance(inputs, dict) else {},
            rng,
            file_id_for(request_id),
            cfg.size_scale,
        )
        # draws added later come last, so older knobs keep their stories
        decisions.stop_on_cancel = rng.random() < cfg.cancel_stop_rate
        run_fractions: list[tuple[float, float]] = []
        for _ in range(cfg.requeue_limit):
            again, fraction, wait = rng.random(), rng.uniform(0.1, 0.9), rng.random()
            if again < cfg.requeue_rate and len(run_fractions) == decisions.requeues:
                run_fractions.append((fraction, wait))
                decisions.requeues += 1
        if decisions.early and webhook_url:
            decisions.queue_delay = 0.0
            decisions.run_time = 0.0
            run_fractions.clear()
            decisions.requeues = 0
        now_mono, now_wall = time.monotonic(), time.time()
        attempts: list[Attempt] = []
        start = now_mono + decisions.queue_delay
        gateway_id = str(uuid.uuid4())
        for fraction, wait in run_fractions:
            stop = start + decisions.run_time * fraction
            attempts.append(Attempt(start, stop, gateway_id))
            start = stop + decisions.queue_delay * (0.5 + wait)
            gateway_id = str(uuid.uuid4())
        attempts.append(Attempt(start, start + decisions.run_time, gateway_id))
        end_mono = start + decisions.run_time
        timeout_mono = None
        if lifecycle.start_timeout is not None and decisions.queue_delay > lifecycle.start_timeout:
            timeout_mono = now_mono + lifecycle.start_timeout
            end_mono = timeout_mono
        req = SimRequest(
            request_id=request_id,
            gateway_request_id=attempts[0].gateway_request_id,
            index=index,
            endpoint=endpoint,
            app_path=app_path,
            inputs=inputs,
            webhook_url=webhook_url,
            base_url=base_url.rstrip("/"),
            decisions=decisions,
            planned=planned,
            lifecycle=lifecycle,
            submitted_mono=now_mono,
            submitted_wall=now_wall,
            attempts=attempts,
            end_mono=end_mono,
            sync=sync,
            timeout_mono=timeout_mono,
            tags=dict(tags or {}),
        )
        if not sync and self.validation_stage(endpoint) == "run":
            req.validation_errors = validate_inputs(endpoint, inputs)
        self.requests[request_id] = req
        early = decisions.early and webhook_url
        if cfg.concurrency_limit is not None and timeout_mono is None and not early:
            req.awaiting_slot = True
            if lifecycle.start_timeout is not None:
                req.slot_deadline = now_mono + lifecycle.start_timeout
            self.waiting[request_id] = req
        for listener in self.submit_listeners:
            try:
                listener(req)
            except Exception:  # a listener must never break the queue
                log.exception("submit listener failed for %s", req.request_id)
        self._spawn(self._lifecycle(req))
        return req

    def answer_lost(self, req: SimRequest) -> bool:
        """Whether this submit's answer is lost after fal enqueued it (a draw of its own
        per request, so the other knobs keep their stories)."""
        rate = self.config.submit_lost_answer_rate
        if not rate:
            return False
        lost = lost_answer_draw(self.config.seed, req.index) < rate
        if lost:
            self.api_faults["lost_answer"] += 1
        return lost

    async def _lifecycle(self, req: SimRequest) -> None:
        while req.state not in TERMINAL:
            if req.awaiting_slot:
                await self._await_slot(req)
                continue
            delay = req.end_mono - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.refresh(req)

    async def _await_slot(self, req: SimRequest) -> None:
        """Wait until the cap grants this request a slot, or its start_timeout passes."""
        now = time.monotonic()
        if now >= req.attempts[0].start:
            self._pump()
        if req.awaiting_slot:
            wakes = [t for t in (req.attempts[0].start, req.slot_deadline) if t and t > now]
            timeout = min(wakes) - now if wakes else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(req.slot_event.wait(), timeout)
        self.refresh(req)

    def _pump(self) -> None:
        """Give free slots to waiting requests whose queue delay has passed: normal first."""
        if not self.waiting:
            return
        limit = self.config.concurrency_limit
        free = len(self.waiting) if limit is None else limit - len(self.holding)
        if free <= 0:
            return
        now = time.monotonic()
        ready = [r for r in self.waiting.values() if now >= r.attempts[0].start]
        ready.sort(key=lambda r: (r.lifecycle.priority != "normal", r.index))
        for req in ready[:free]:
            shift = now - req.attempts[0].start
            for attempt in req.attempts:
                attempt.start += shift
                attempt.stop += shift
            req.end_mono += shift
            req.awaiting_slot = False
            del self.waiting[req.request_id]
            self.holding.add(req.request_id)
            req.slot_event.set()

    # ----- state -----------------------------------------------------------------------------

    def refresh(self, req: SimRequest) -> State:
        """Advance the request to where the clock says it is; finish it at most once."""
        if req.state in TERMINAL:
            return req.state
        now = time.monotonic()
        if req.awaiting_slot:
            if req.slot_deadline is not None and now >= req.slot_deadline:
                self._finish(req, "failed", "start_timeout")
            return req.state
        if req.timeout_mono is not None:
            if now >= req.timeout_mono:
                self._finish(req, "failed", "start_timeout")
            return req.state
        current: Attempt | None = None
        running = False
        for attempt in req.attempts:
            if now >= attempt.start:
                current = attempt
                running = now < attempt.stop
        if current is not None:
            if req.started_wall is None:
                req.started_wall = req.submitted_wall + (req.start_mono - req.submitted_mono)
            req.gateway_request_id = current.gateway_request_id
        if now >= req.end_mono:
            if req.will_fail:
                self._finish(req, "failed", "model_error")
            else:
                self._finish(req, "completed", "ok")
        else:
            req.state = "in_progress" if running else "queued"
        return req.state

    def _finish(self, req: SimRequest, state: State, ending: Ending) -> None:
        req.state = state
        req.ending = ending
        req.finished_wall = time.time()
        if req.started_wall is None and ending in ("ok", "model_error"):
            req.started_wall = req.finished_wall
        if state == "completed":
            self._publish_output(req)
        req.done.set()
        req.awaiting_slot = False
        req.slot_event.set()
        self.waiting.pop(req.request_id, None)
        if req.request_id in self.holding:
            self.holding.discard(req.request_id)
            self._pump()
        for listener in self.finish_listeners:
            try:
                listener(req)
            except Exception:  # a listener must never break the queue
                log.exception("finish listener failed for %s", req.request_id)
        # an "early" request is delivered inline by the submit handler (deliver_now)
        if req.webhook_url and not req.decisions.early:
            self.schedule_webhooks(req)

    def cancel(self, req: SimRequest) -> Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED"]:
        """fal's cancel: a queued request leaves the queue; a running one is only signalled.

        The signalled app usually finishes (and is billed); `cancel_stop_rate` decides,
        per request, whether it stops instead.
        """
        state = self.refresh(req)
        if state in TERMINAL:
            return "ALREADY_COMPLETED"
        req.cancel_requested = True
        if state == "queued" or req.decisions.stop_on_cancel:
            self._finish(req, "canceled", "cancelled")
        return "CANCELLATION_REQUESTED"

    def queue_position(self, req: SimRequest) -> int:
        """Requests of the same app served before this one (normal priority goes first)."""
        rank = (req.lifecycle.priority != "normal", req.index)
        return sum(
            1
            for other in self.requests.values()
            if (other.lifecycle.priority != "normal", other.index) < rank
            and other.app_path == req.app_path
            and self.refresh(other) == "queued"
        )

    def logs(self, req: SimRequest) -> list[dict[str, Any]]:
        """Log lines the runner has written so far (grow with elapsed run time)."""
        if req.started_wall is None:
            return []
        final = req.attempts[-1]
        entries = [("INFO", f"Starting generation on runner sim-{req.index % 4}", 0.0)]
        for number, attempt in enumerate(req.attempts[:-1], start=1):
            if time.monotonic() >= attempt.stop:
                offset = attempt.stop - req.start_mono
                entries.append(("WARNING", f"Runner lost; request re-queued ({number})", offset))
        run = max(req.decisions.run_time, 1e-9)
        elapsed = time.monotonic() - final.start
        base = final.start - req.start_mono
        for step in (25, 50, 75):
            if elapsed >= run * step / 100 or req.state in ("completed", "failed"):
                entries.append(("INFO", f"Generating: {step}%", base + run * step / 100))
        if req.state == "completed":
            entries.append(("INFO", "Generation complete", base + run))
        elif req.ending == "model_error":
            entries.append(("ERROR", "Model rejected the request (422)", base + run))
        elif req.ending == "cancelled":
            entries.append(("WARNING", "Cancellation requested; stopping", max(elapsed, 0.0)))
        return [
            {
                "message": message,
                "level": level,
                "source": "user",
                "timestamp": _iso(req.started_wall + offset),
            }
            for level, message, offset in entries
        ]

    # ----- outputs and the CDN ---------------------------------------------------------------

    def _publish_output(self, req: SimRequest) -> None:
        """Upload the output to the CDN; it lives for the lifetime the request asked for."""
        file = req.planned.file
        path = f"/files/b/{file.file_id}/{_url_token(req.request_id)}_{file.file_name}"
        lifetime = req.lifecycle.object_lifetime
        now = req.finished_wall or time.time()
        self.files[path] = CdnFile(
            path, file, now, None if lifetime is None else now + lifetime, req.request_id
        )
        req.cdn_path = path

    def add_file(
        self,
        base_url: str,
        size: int,
        *,
        name: str = "output.mp4",
        content_type: str = "video/mp4",
        lifetime: float | None = None,
    ) -> CdnFile:
        """A file on the CDN with no request behind it (benchmarks of the archive)."""
        file_id = secrets.token_hex(4)
        file = OutputFile(f"{file_id}-{secrets.token_hex(8)}", name, content_type, size)
        path = f"/files/b/{file_id}/{_url_token(file.file_id)}_{name}"
        now = time.time()
        entry = CdnFile(path, file, now, None if lifetime is None else now + lifetime)
        self.files[path] = entry
        return entry

    def cdn_file(self, path: str) -> CdnFile | None:
        return self.files.get(path)

    def file_url(self, req: SimRequest) -> str:
        """The output's URL: public and stable (or, in `signed` mode, freshly signed)."""
        file = req.planned.file
        if self.config.cdn_mode == "signed":
            path = f"/files/b/{file.file_id}/{file.file_name}"
            expires = math.ceil(time.time() + self.config.cdn_url_ttl)
            signed = f"{path}\n{file.file_size}"
            length = ""
            if file.seconds is not None:  # the header's duration is part of the file
                millis = round(file.seconds * 1000)
                signed += f"\n{millis}"
                length = f"&ms={millis}"
            sig = self.url_signer.signature(signed, expires)
            return f"{req.base_url}{path}?size={file.file_size}{length}&exp={expires}&sig={sig}"
        return f"{req.base_url}{req.cdn_path}"

    def output(self, req: SimRequest) -> dict[str, Any]:
        prompt = req.inputs.get("prompt") if isinstance(req.inputs, dict) else None
        return req.planned.payload(
            self.file_url(req), prompt, req.decisions.run_time, extras=self.config.output_extras
        )

    def result_expired(self, req: SimRequest) -> bool:
        """fal keeps results ~1 h, or for the payload retention when payload storage is on."""
        if req.payloads_deleted:
            return True
        ttl = self.config.payload_ttl if req.lifecycle.store_io else self.config.result_ttl
        return req.finished_wall is not None and time.time() - req.finished_wall > ttl

    def delete_io(self, req: SimRequest, base_url: str) -> list[dict[str, Any]]:
        """fal's delete_io: drop the request's payloads and its output files from the CDN."""
        req.payloads_deleted = True
        results = []
        if req.cdn_path is not None:
            entry = self.files[req.cdn_path]
            link = f"{base_url.rstrip('/')}{entry.path}"
            if entry.deleted or not entry.alive(time.time()):
                results.append({"link": link, "exception": "File not found"})
            else:
                entry.deleted = True
                results.append({"link": link, "exception": None})
        return results

    def billed_seconds(self, req: SimRequest) -> float:
        """What fal would bill: output seconds for successful videos, nothing otherwise."""
        if req.state != "completed":
            return 0.0
        return req.planned.billed_seconds or 0.0

    def ground_truth(self, req: SimRequest) -> dict[str, Any]:
        state = self.refresh(req)
        entry = self.files.get(req.cdn_path) if req.cdn_path else None
        return {
            "request_id": req.request_id,
            "gateway_request_id": req.gateway_request_id,
            "gateway_request_ids": [a.gateway_request_id for a in req.attempts],
            "index": req.index,
            "endpoint": req.endpoint,
            "family": req.planned.family,
            "app": req.app_path,
            "inputs": req.inputs,
            "webhook_url": req.webhook_url,
            "sync": req.sync,
            "status": state,
            "ending": req.ending,
            "error_type": req.error_body().get("error_type") if state == "failed" else None,
            "cancel_requested": req.cancel_requested,
            "output": self.output(req) if state == "completed" else None,
            "error": req.error_body() if state in ("failed", "canceled") else None,
            "billed_seconds": self.billed_seconds(req),
            "output_duration": req.planned.duration,
            "file_size": req.planned.file.file_size,
            "file_url": f"{req.base_url}{entry.path}" if entry else None,
            "file_expires_at": entry.expires_wall if entry else None,
            "file_deleted": entry.deleted if entry else None,
            "object_lifetime": req.lifecycle.object_lifetime,
            "start_timeout": req.lifecycle.start_timeout,
            "priority": req.lifecycle.priority,
            "runner_hint": req.lifecycle.runner_hint,
            "store_io": req.lifecycle.store_io,
            "payloads_deleted": req.payloads_deleted,
            "submitted_at": req.submitted_wall,
            "started_at": req.started_wall,
            "queue_wait": (
                None if req.started_wall is None else req.started_wall - req.submitted_wall
            ),
            "finished_at": req.finished_wall,
            "decisions": dict(req.decisions.__dict__),
            "tags": dict(req.tags),
        }

    # ----- webhooks --------------------------------------------------------------------------

    def webhook_body(self, req: SimRequest) -> bytes:
        """fal's webhook body, `json.dumps(..., sort_keys=True)`; fixed once, same on retries."""
        if req.webhook_bytes is None:
            req.webhook_bytes = self._render_webhook(req)
        return req.webhook_bytes

    def _render_webhook(self, req: SimRequest) -> bytes:
        body: dict[str, Any] = {
            "request_id": req.request_id,
            "gateway_request_id": req.gateway_request_id,
        }
        if req.state == "completed":
            if req.decisions.payload_error:
                body.update(
                    status="OK",
                    payload=None,
                    error=None,
                    payload_error="Response payload could not be serialized to JSON",
                )
            else:
                body.update(status="OK", payload=self.output(req), error=None)
        else:  # failed, timed out or cancelled: the error body fal's result endpoint has
            body.update(
                status="ERROR",
                payload=req.error_body(),
                error=f"Invalid status code: {req.http_status}",
            )
        return json.dumps(body, sort_keys=True).encode("utf-8")

    def schedule_webhooks(self, req: SimRequest) -> None:
        """Queue the delivery of the final webhook, applying drop/duplicate/reorder/delay."""
        d = req.decisions
        if d.drop:
            self.deliveries.append(
                Delivery(
                    req.request_id,
                    req.gateway_request_id,
                    0,
                    0,
                    time.time(),
                    "dropped",
                    url=req.webhook_url,
                    status=req.state,
                )
            )
            return
        delay = d.webhook_delay + (d.out_of_order_delay if d.out_of_order else 0.0)
        self._spawn(self._deliver(req, copy=0, delay=delay))
        if d.duplicate:
            self._spawn(self._deliver(req, copy=1, delay=delay + d.duplicate_delay))

    async def deliver_now(self, req: SimRequest) -> bool:
        """One attempt, inline (early delivery before the submit response); retries go async."""
        if not req.webhook_url:
            raise ValueError(f"{req.request_id}: no webhook URL to deliver to")
        if req.decisions.drop:
            self.schedule_webhooks(req)
            return False
        timestamp = self._timestamp()
        outcome = await self._attempt(req, copy=0, attempt=1, timestamp=timestamp)
        if outcome == "retry":
            self._spawn(self._deliver(req, copy=0, delay=0.0, first_attempt=2, timestamp=timestamp))
        if req.decisions.duplicate:
            self._spawn(self._deliver(req, copy=1, delay=req.decisions.duplicate_delay))
        return outcome == "delivered"

    def retry_delay(self, attempt: int) -> float:
        return retry_schedule(self.config)[attempt - 2]

    def _timestamp(self) -> str:
        return str(int(time.time() + self.config.webhook_clock_skew))

    async def _deliver(
        self,
        req: SimRequest,
        *,
        copy: int,
        delay: float,
        first_attempt: int = 1,
        timestamp: str | None = None,
    ) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        cfg = self.config
        for attempt in range(first_attempt, cfg.webhook_max_attempts + 1):
            if attempt > 1:
                await asyncio.sleep(self.retry_delay(attempt))
            if timestamp is None or not cfg.webhook_keep_timestamp:
                timestamp = self._timestamp()
            if await self._attempt(req, copy=copy, attempt=attempt, timestamp=timestamp) != "retry":
                return

    def _retried(self, status_code: int | None) -> bool:
        """Whether fal would try again after this answer (None: timeout or transport error)."""
        if status_code is None or status_code >= 500:
            return True
        return self.config.webhook_retry_on == "4xx+5xx" and 400 <= status_code < 500

    async def _attempt(
        self, req: SimRequest, *, copy: int, attempt: int, timestamp: str
    ) -> Literal["delivered", "retry", "final"]:
        if not req.webhook_url or self.http is None:
            raise RuntimeError(f"{req.request_id}: no webhook URL, or the engine is not started")
        body = self.webhook_body(req)
        user_id = self.config.webhook_user_id
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "fal-webhook/1.0 (renderqueue simulator)",
            "X-Fal-Webhook-Request-Id": req.request_id,
            "X-Fal-Webhook-User-Id": user_id,
            "X-Fal-Webhook-Timestamp": timestamp,
            "X-Fal-Webhook-Signature": self.signer.sign(req.request_id, user_id, timestamp, body),
        }
        record = Delivery(
            req.request_id,
            req.gateway_request_id,
            copy,
            attempt,
            time.time(),
            "failed",
            url=req.webhook_url,
            status=req.state,
            timestamp=timestamp,
        )
        try:
            response = await self.http.post(
                req.webhook_url, content=body, headers=headers, timeout=self.config.webhook_timeout
            )
            record.status_code = response.status_code
            if 200 <= response.status_code < 300:
                record.outcome = "delivered"
        except httpx.HTTPError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        if record.outcome != "delivered":
            record.will_retry = (
                self._retried(record.status_code) and attempt < self.config.webhook_max_attempts
            )
        self.deliveries.append(record)
        log.debug("webhook %s copy=%s attempt=%s -> %s", req.request_id, copy, attempt, record)
        if record.outcome == "delivered":
            return "delivered"
        return "retry" if self._retried(record.status_code) else "final"


def retry_schedule(config: SimConfig) -> list[float]:
    """Seconds before each retry of a webhook: doubling from the base, capped.

    Defaults (7 s, doubling, 3600 s cap, 11 attempts) make 10 retries over 7161 s,
    fal's "10 times in the span of 2 hours".
    """
    return [
        min(config.webhook_retry_base * 2**n, config.webhook_retry_max)
        for n in range(config.webhook_max_attempts - 1)
    ]


def lost_answer_draw(seed: int, index: int) -> float:
    """The draw that decides whether request `index`'s submit answer is lost."""
    return random.Random(f"{seed}:lost-answer:{index}").random()


def _no_faults() -> dict[str, int]:
    return {"429": 0, "503": 0, "500": 0, "502": 0, "504": 0, "lost_answer": 0}
