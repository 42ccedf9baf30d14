"""The simulator's state machine: requests, their timeline, outcomes and webhook deliveries.

Every decision about a request (queue delay, run time, failure, webhook faults,
output) is drawn at submit time from an RNG seeded by `seed` and the request's
index, in a fixed order, so one seed gives the same story whatever the wall
clock does and whichever knobs change. Request ids stay random (uuid4) so that
restarting with the same seed never reuses an id a ledger already holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from renderqueue_pipeline.simulator.config import SimConfig
from renderqueue_pipeline.simulator.keys import UrlSigner, WebhookSigner
from renderqueue_pipeline.simulator.models import PlannedOutput, plan_output, validate_inputs

log = logging.getLogger("renderqueue.simulator")

State = Literal["queued", "in_progress", "completed", "failed", "canceled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "canceled"})

FAILURE_DETAIL = [
    {
        "loc": ["body", "prompt"],
        "msg": "The content could not be processed because it was flagged by a content checker.",
        "type": "content_policy_violation",
    }
]


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
    submitted_mono: float
    submitted_wall: float
    start_mono: float
    end_mono: float
    sync: bool = False
    validation_errors: list[dict[str, Any]] = field(default_factory=list)
    state: State = "queued"
    finished_wall: float | None = None
    started_wall: float | None = None
    cancel_requested: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    webhook_bytes: bytes | None = None

    @property
    def will_fail(self) -> bool:
        return self.decisions.fail or bool(self.validation_errors)

    def error_body(self) -> dict[str, Any]:
        return {"detail": self.validation_errors or FAILURE_DETAIL}


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

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _iso(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).isoformat().replace("+00:00", "Z")


class Engine:
    """All mutable simulator state; lives on the server's event loop only."""

    def __init__(self, config: SimConfig, signer: WebhookSigner, url_signer: UrlSigner) -> None:
        self.config = config
        self.signer = signer
        self.url_signer = url_signer
        self.requests: dict[str, SimRequest] = {}
        self.deliveries: list[Delivery] = []
        self.counter = 0
        self.api_calls = 0
        self.api_draws = 0  # restarts when the config changes: "set faults, then call" replays
        self.api_faults: dict[str, int] = {"429": 0, "503": 0, "500": 0}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.http: httpx.AsyncClient | None = None
        # called with each request as it finishes (the Platform API simulator bills from it)
        self.finish_listeners: list[Callable[[SimRequest], None]] = []

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
        """Forget every request and delivery and start counting from zero under `config`."""
        await self._cancel_tasks()
        self.config = config
        self.requests.clear()
        self.deliveries.clear()
        self.counter = 0
        self.api_calls = 0
        self.api_draws = 0
        self.api_faults = {"429": 0, "503": 0, "500": 0}

    def update_config(self, config: SimConfig) -> None:
        """Apply new knobs to requests submitted from now on; API fault draws restart."""
        self.config = config
        self.api_draws = 0

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ----- API faults ------------------------------------------------------------------------

    def api_fault(self) -> Literal["429", "503", "500"] | None:
        """Decide whether this API call fails transiently (one RNG per call, by call index)."""
        self.api_calls += 1
        self.api_draws += 1
        cfg = self.config
        if not (cfg.api_429_rate or cfg.api_503_rate or cfg.api_500_rate):
            return None
        u = random.Random(f"{cfg.seed}:api:{self.api_draws}").random()
        fault: Literal["429", "503", "500"] | None = None
        if u < cfg.api_429_rate:
            fault = "429"
        elif u < cfg.api_429_rate + cfg.api_503_rate:
            fault = "503"
        elif u < cfg.api_429_rate + cfg.api_503_rate + cfg.api_500_rate:
            fault = "500"
        if fault:
            self.api_faults[fault] += 1
        return fault

    # ----- submit ----------------------------------------------------------------------------

    def create(
        self,
        endpoint: str,
        app_path: str,
        inputs: Any,
        webhook_url: str | None,
        base_url: str,
        *,
        sync: bool = False,
    ) -> SimRequest:
        """Register a request and draw all its decisions (fixed draw order: keep it stable)."""
        cfg = self.config
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
            endpoint, inputs if isinstance(inputs, dict) else {}, rng, request_id, cfg.size_scale
        )
        if decisions.early and webhook_url:
            decisions.queue_delay = 0.0
            decisions.run_time = 0.0
        now_mono, now_wall = time.monotonic(), time.time()
        req = SimRequest(
            request_id=request_id,
            gateway_request_id=str(uuid.uuid4()),
            index=index,
            endpoint=endpoint,
            app_path=app_path,
            inputs=inputs,
            webhook_url=webhook_url,
            base_url=base_url.rstrip("/"),
            decisions=decisions,
            planned=planned,
            submitted_mono=now_mono,
            submitted_wall=now_wall,
            start_mono=now_mono + decisions.queue_delay,
            end_mono=now_mono + decisions.queue_delay + decisions.run_time,
            sync=sync,
        )
        if cfg.validation == "run":
            req.validation_errors = validate_inputs(endpoint, inputs)
        self.requests[request_id] = req
        self._spawn(self._lifecycle(req))
        return req

    async def _lifecycle(self, req: SimRequest) -> None:
        delay = req.end_mono - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self.refresh(req)

    # ----- state -----------------------------------------------------------------------------

    def refresh(self, req: SimRequest) -> State:
        """Advance the request to where the clock says it is; finish it at most once."""
        if req.state in TERMINAL:
            return req.state
        now = time.monotonic()
        if now >= req.start_mono and req.started_wall is None:
            req.started_wall = req.submitted_wall + (req.start_mono - req.submitted_mono)
        if now >= req.end_mono:
            self._finish(req, "failed" if req.will_fail else "completed")
        elif now >= req.start_mono:
            req.state = "in_progress"
        return req.state

    def _finish(self, req: SimRequest, state: State) -> None:
        req.state = state
        req.finished_wall = time.time()
        if req.started_wall is None and state != "canceled":
            req.started_wall = req.finished_wall
        req.done.set()
        for listener in self.finish_listeners:
            try:
                listener(req)
            except Exception:  # a listener must never break the queue
                log.exception("finish listener failed for %s", req.request_id)
        # an "early" request is delivered inline by the submit handler (deliver_now)
        if req.webhook_url and not req.decisions.early:
            self.schedule_webhooks(req)

    def cancel(self, req: SimRequest) -> Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED"]:
        """fal's cancel: removes a queued request; signals a running one (honored or not)."""
        state = self.refresh(req)
        if state in TERMINAL:
            return "ALREADY_COMPLETED"
        req.cancel_requested = True
        if state == "queued" or self.config.cancel_in_progress == "honor":
            self._finish(req, "canceled")
        return "CANCELLATION_REQUESTED"

    def queue_position(self, req: SimRequest) -> int:
        return sum(
            1
            for other in self.requests.values()
            if other.index < req.index
            and other.app_path == req.app_path
            and self.refresh(other) == "queued"
        )

    def logs(self, req: SimRequest) -> list[dict[str, Any]]:
        """Log lines the runner has written so far (grow with elapsed run time)."""
        if req.started_wall is None:
            return []
        entries = [("INFO", f"Starting generation on runner sim-{req.index % 4}", 0.0)]
        run = max(req.decisions.run_time, 1e-9)
        elapsed = time.monotonic() - req.start_mono
        for step in (25, 50, 75):
            if elapsed >= run * step / 100 or req.state in ("completed", "failed"):
                entries.append(("INFO", f"Generating: {step}%", run * step / 100))
        if req.state == "completed":
            entries.append(("INFO", "Generation complete", run))
        elif req.state == "failed":
            entries.append(("ERROR", "Model rejected the request (422)", run))
        elif req.state == "canceled":
            entries.append(("WARNING", "Cancellation requested; stopping", elapsed))
        return [
            {
                "message": message,
                "level": level,
                "source": "user",
                "timestamp": _iso(req.started_wall + offset),
            }
            for level, message, offset in entries
        ]

    # ----- outputs ---------------------------------------------------------------------------

    def file_url(self, req: SimRequest) -> str:
        """A freshly signed CDN URL for the request's output (expires after cdn_url_ttl)."""
        file = req.planned.file
        path = f"/files/b/{file.file_id}/{file.file_name}"
        expires = math.ceil(time.time() + self.config.cdn_url_ttl)
        sig = self.url_signer.signature(f"{path}\n{file.file_size}", expires)
        return f"{req.base_url}{path}?size={file.file_size}&exp={expires}&sig={sig}"

    def output(self, req: SimRequest) -> dict[str, Any]:
        prompt = req.inputs.get("prompt") if isinstance(req.inputs, dict) else None
        return req.planned.payload(self.file_url(req), prompt, req.decisions.run_time)

    def billed_seconds(self, req: SimRequest) -> float:
        """What fal would bill: output seconds for successful videos, nothing otherwise."""
        if req.state != "completed":
            return 0.0
        return req.planned.billed_seconds or 0.0

    def ground_truth(self, req: SimRequest) -> dict[str, Any]:
        state = self.refresh(req)
        return {
            "request_id": req.request_id,
            "gateway_request_id": req.gateway_request_id,
            "index": req.index,
            "endpoint": req.endpoint,
            "app": req.app_path,
            "inputs": req.inputs,
            "webhook_url": req.webhook_url,
            "sync": req.sync,
            "status": state,
            "cancel_requested": req.cancel_requested,
            "output": self.output(req) if state == "completed" else None,
            "error": req.error_body() if state == "failed" else None,
            "billed_seconds": self.billed_seconds(req),
            "output_duration": req.planned.duration,
            "file_size": req.planned.file.file_size,
            "submitted_at": req.submitted_wall,
            "started_at": req.started_wall,
            "finished_at": req.finished_wall,
            "decisions": dict(req.decisions.__dict__),
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
        elif req.state == "failed":
            body.update(status="ERROR", payload=req.error_body(), error="Invalid status code: 422")
        else:  # canceled
            body.update(
                status="ERROR",
                payload={"detail": "Request was cancelled", "error_type": "request_cancelled"},
                error="Request cancelled",
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
        assert req.webhook_url
        if req.decisions.drop:
            self.schedule_webhooks(req)
            return False
        ok = await self._attempt(req, copy=0, attempt=1)
        if not ok:
            self._spawn(self._deliver(req, copy=0, delay=0.0, first_attempt=2))
        if req.decisions.duplicate:
            self._spawn(self._deliver(req, copy=1, delay=req.decisions.duplicate_delay))
        return ok

    async def _deliver(
        self, req: SimRequest, *, copy: int, delay: float, first_attempt: int = 1
    ) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        cfg = self.config
        for attempt in range(first_attempt, cfg.webhook_max_attempts + 1):
            if attempt > 1:
                backoff = min(cfg.webhook_retry_base * 2 ** (attempt - 2), cfg.webhook_retry_max)
                await asyncio.sleep(backoff)
            if await self._attempt(req, copy=copy, attempt=attempt):
                return

    async def _attempt(self, req: SimRequest, *, copy: int, attempt: int) -> bool:
        assert req.webhook_url and self.http is not None
        body = self.webhook_body(req)
        user_id = self.config.webhook_user_id
        timestamp = str(int(time.time() + self.config.webhook_clock_skew))
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
        self.deliveries.append(record)
        log.debug("webhook %s copy=%s attempt=%s -> %s", req.request_id, copy, attempt, record)
        return record.outcome == "delivered"
