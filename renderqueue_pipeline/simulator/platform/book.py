"""The billing book: every event fal would bill, fed by the queue engine, and the request
list (every request the engine accepted, with its tags)."""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from renderqueue_pipeline.simulator.models import is_image_endpoint
from renderqueue_pipeline.simulator.platform.events import BillingEvent, discounted_nanos, iso
from renderqueue_pipeline.simulator.platform.prices import PriceBook
from renderqueue_pipeline.simulator.platform.synthetic import SyntheticBilling

if TYPE_CHECKING:
    from renderqueue_pipeline.simulator.engine import Engine, SimRequest


class BillingConfig(BaseModel):
    """Knobs of fal's billing, changeable at run time through the control API."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = 0
    admin_key: str | None = None  # None: the simulator home's admin key (ApiKeys)
    billing_delay: float = Field(default=0.0, ge=0.0)  # seconds before an event appears
    units_mismatch_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    units_mismatch_seconds: float = 1.0  # extra seconds billed for those requests
    percent_discount: dict[str, float] = Field(default_factory=dict)
    #: fal reports usage by tag only once reporting is enabled for the account
    usage_by_tag: bool = True

    def public(self) -> dict[str, Any]:
        data = self.model_dump()
        if data.get("admin_key"):
            data["admin_key"] = "***"
        return data


class BillingBook:
    """Every billing event fal would report; fed by the engine when a request completes.

    Thread-safe: the queue engine writes from its event loop, the Platform API server reads
    from its own.
    """

    def __init__(self, config: BillingConfig | None = None, prices: PriceBook | None = None):
        self.config = config or BillingConfig()
        self.prices = prices or PriceBook()
        self._lock = threading.Lock()
        self._events: list[BillingEvent] = []
        self._keys: list[tuple[float, str]] = []
        self._synthetic: list[SyntheticBilling] = []
        self._counter = 0
        self._requests: list[SimRequest] = []  # in submit order (the request list)
        self.engine: Engine | None = None  # set by `attach` (outputs of expand=payloads)

    def reset(self, config: BillingConfig | None = None) -> None:
        with self._lock:
            self.config = config or BillingConfig()
            self.prices = PriceBook()
            self._events.clear()
            self._keys.clear()
            self._synthetic.clear()
            self._counter = 0
            self._requests.clear()

    # -- the request list

    def record_request(self, req: SimRequest) -> None:
        """The engine's submit listener: every accepted request shows in the request list."""
        if req.sync:
            return
        with self._lock:
            self._requests.append(req)

    def request_page(
        self,
        endpoint_ids: list[str],
        start: float,
        end: float,
        *,
        statuses: set[str],
        request_ids: list[str],
        limit: int,
        cursor: tuple[float, str] | None,
        payloads: bool,
    ) -> tuple[list[dict[str, Any]], tuple[float, str] | None]:
        """One page of the request list in (sent_at, request_id) order, and the next key."""
        wanted_ids = set(request_ids)
        with self._lock:
            candidates = list(self._requests)
        matching = []
        for req in candidates:
            key = (req.submitted_wall, req.request_id)
            if req.endpoint not in endpoint_ids or not start <= req.submitted_wall < end:
                continue
            if cursor is not None and key <= cursor:
                continue
            if wanted_ids and req.request_id not in wanted_ids:
                continue
            status = request_status(req)
            if statuses and status not in statuses:
                continue
            matching.append((key, req))
        matching.sort(key=lambda pair: pair[0])
        page = matching[: limit + 1]
        after = page[limit - 1][0] if len(page) > limit else None
        return [request_entry(req, payloads, self.engine) for _, req in page[:limit]], after

    # -- writers

    def record_completion(self, req: SimRequest) -> None:
        """The engine's finish listener: bill a successful video by its real seconds."""
        if req.state != "completed" or is_image_endpoint(req.endpoint):
            return
        seconds = req.planned.duration
        if seconds is None or req.finished_wall is None:
            return
        inputs = req.inputs if isinstance(req.inputs, dict) else {}
        self.bill(
            req.request_id,
            req.endpoint,
            inputs,
            seconds,
            req.submitted_wall,
            req.finished_wall,
            tags=req.tags,
        )

    def bill(
        self,
        request_id: str,
        endpoint: str,
        inputs: dict[str, Any],
        seconds: float,
        submitted_at: float,
        finished_at: float,
        *,
        tags: dict[str, str] | None = None,
    ) -> BillingEvent | None:
        """Bill one successful request (None when the endpoint has no price here)."""
        cfg = self.config
        with self._lock:
            price = self.prices.row_for(endpoint, inputs, submitted_at)
            if price is None:
                return None
            draw = random.Random(f"{cfg.seed}:bill:{self._counter}").random()
            self._counter += 1
            units = float(seconds)
            if draw < cfg.units_mismatch_rate:
                units += cfg.units_mismatch_seconds
            discount = cfg.percent_discount.get(endpoint)
            event = BillingEvent(
                request_id=request_id,
                endpoint_id=endpoint,
                timestamp=finished_at,
                output_units=units,
                unit_price=price.micros_per_second / 1_000_000,
                percent_discount=discount,
                cost_estimate_nano_usd=discounted_nanos(price.cost_nanos(units), discount),
                visible_at=finished_at + cfg.billing_delay,
                tags=tuple(sorted((tags or {}).items())),
            )
            self._insert(event)
        return event

    def add(self, events: Iterable[BillingEvent]) -> int:
        """Add events by hand (another system using the key, a correction, ...)."""
        count = 0
        with self._lock:
            for event in events:
                self._insert(event)
                count += 1
        return count

    def add_synthetic(self, run: SyntheticBilling) -> None:
        with self._lock:
            self._synthetic.append(run)

    def _insert(self, event: BillingEvent) -> None:
        at = bisect.bisect_right(self._keys, event.key)
        self._keys.insert(at, event.key)
        self._events.insert(at, event)

    # -- readers

    def events(self) -> list[BillingEvent]:
        with self._lock:
            return list(self._events)

    def iter_events(
        self, start: float, end: float, after: tuple[float, str] | None, now: float
    ) -> Iterator[BillingEvent]:
        """Visible events with start <= timestamp < end, strictly after `after`, in key order."""
        with self._lock:
            lo = bisect.bisect_left(self._keys, (start, ""))
            if after is not None:
                lo = max(lo, bisect.bisect_right(self._keys, after))
            real = self._events[lo:]
            synthetic = list(self._synthetic)
        sources = ([iter(real)] if real else []) + [
            run.iter_after(after, start) for run in synthetic
        ]
        merged = sources[0] if len(sources) == 1 else heapq.merge(*sources, key=lambda e: e.key)
        for event in merged:
            if event.timestamp >= end:
                return
            if event.visible_at <= now:
                yield event

    def page(
        self,
        start: float,
        end: float,
        *,
        endpoint_ids: list[str],
        request_ids: list[str],
        limit: int,
        cursor: tuple[float, str] | None,
        now: float,
    ) -> tuple[list[BillingEvent], tuple[float, str] | None]:
        """One page and the key to continue after (None at the end)."""
        wanted_endpoints = set(endpoint_ids)
        wanted_requests = set(request_ids)
        matching = self.iter_events(start, end, cursor, now)
        if wanted_endpoints or wanted_requests:
            matching = (
                e
                for e in matching
                if (not wanted_endpoints or e.endpoint_id in wanted_endpoints)
                and (not wanted_requests or e.request_id in wanted_requests)
            )
        chunk = list(itertools.islice(matching, limit + 1))
        if len(chunk) > limit:
            return chunk[:limit], chunk[limit - 1].key
        return chunk, None


# ----- the request list and the engine's listeners ----------------------------------------------


def request_status(req: SimRequest) -> str | None:
    """The request list's status: success, user_error (the request's own fault: a model's
    422), error (timed out before starting, cancelled); None while queued or running."""
    if req.ending is None:
        return None
    if req.ending == "ok":
        return "success"
    return "user_error" if req.ending == "model_error" else "error"


def request_entry(req: SimRequest, payloads: bool, engine: Engine | None) -> dict[str, Any]:
    """One entry of the request list (field names: see docs/simulator.md; unverified)."""
    if req.ending is not None:
        state = "COMPLETED"
    elif req.attempts and not req.awaiting_slot and time.monotonic() >= req.start_mono:
        state = "IN_PROGRESS"
    else:
        state = "IN_QUEUE"
    entry: dict[str, Any] = {
        "request_id": req.request_id,
        "endpoint_id": req.endpoint,
        "status": request_status(req),
        "state": state,
        "status_code": req.http_status if req.ending is not None else None,
        "sent_at": iso(req.submitted_wall),
        "started_at": iso(req.started_wall) if req.started_wall is not None else None,
        "ended_at": iso(req.finished_wall) if req.finished_wall is not None else None,
        "tags": dict(req.tags),
    }
    if payloads:
        entry["json_input"] = req.inputs
        if req.ending == "ok" and engine is not None:
            entry["json_output"] = engine.output(req)
        elif req.ending is not None:
            entry["json_output"] = req.error_body()
        else:
            entry["json_output"] = None
    return entry


def attach(engine: Engine, book: BillingBook) -> None:
    """Bill every request the queue engine completes from now on, and list every request
    it accepts (the request list)."""
    book.engine = engine
    if book.record_completion not in engine.finish_listeners:
        engine.finish_listeners.append(book.record_completion)
    if book.record_request not in engine.submit_listeners:
        engine.submit_listeners.append(book.record_request)
