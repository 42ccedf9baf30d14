"""fal's Platform APIs (pricing, billing events, usage) on their own TLS server.

The simulator's queue engine tells the `BillingBook` when a request completes; the book
bills it the way fal does: only successful outputs, `output_units` = seconds of video
actually produced (whatever the output JSON says), `unit_price` from the simulator's own
price list at submit time, an optional `percent_discount` per endpoint, and
`cost_estimate_nano_usd`. Knobs make fal's bill differ on purpose (a delay before events
appear, a share of requests billed with different units) so reconciliation can be proven.

Shapes follow shared/fal-wire.md "Platform APIs": `Authorization: Key <admin key>`,
1-50 endpoint (or request) ids, cursor pagination (`next_cursor`, `has_more`), `limit`
up to 10,000, `end` exclusive, a range of at most 90 days.

The request list (`GET /v1/models/requests/by-endpoint`) shows every request the queue
engine accepted, with the `X-Fal-Tags` it carried: fed by the engine's submit listener
(`attach`), read from this server's thread under the book's lock.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import datetime as dt
import functools
import heapq
import itertools
import json
import logging
import math
import random
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from renderqueue_pipeline.simulator.keys import ApiKeys, key_refusal
from renderqueue_pipeline.simulator.models import is_image_endpoint
from renderqueue_pipeline.simulator.server import bind_socket, client_host, ensure_ca_bundle

if TYPE_CHECKING:
    from renderqueue_pipeline.simulator.engine import Engine, SimRequest

log = logging.getLogger("renderqueue.simulator.platform")

MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1_000
MAX_IDS = 50
MAX_RANGE = dt.timedelta(days=90)
#: the request list: at most 100 a page, a 24 h default window (90 days with request ids)
MAX_REQUEST_PAGE = 100
DEFAULT_REQUEST_WINDOW = 86_400.0
REQUEST_STATUSES = ("success", "error", "user_error")
NANOS_PER_MICRO = 1_000
#: fal's pricing unit for per-second video endpoints.
SECOND = "second"


# ----- prices ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimPrice:
    """One price row, keyed like the ledger's `prices` (null resolution/audio: any)."""

    endpoint: str
    resolution: str | None
    with_audio: bool | None
    micros_per_second: int
    base_micros: int = 0
    base_seconds: float = 0.0
    default_resolution: str | None = None
    effective_from: float = 0.0  # unix seconds
    unit: str = SECOND

    def cost_nanos(self, seconds: float) -> int:
        """fal's cost in nano-dollars: base + max(seconds - base_seconds, 0) x rate."""
        extra = max(seconds - self.base_seconds, 0.0) * self.micros_per_second * NANOS_PER_MICRO
        return self.base_micros * NANOS_PER_MICRO + round(extra)


_JAN_2026 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()
_SEEDANCE = ("bytedance/seedance-2.0/text-to-video", "fal-ai/seedance-2.0/text-to-video")
_SEEDANCE_RATES = {"480p": 134_505, "720p": 303_400, "1080p": 680_400}
_FAST_RATES = {"480p": 107_595, "720p": 241_900, "1080p": 544_275}
_VEO = {
    ("720p", False): 200_000,
    ("720p", True): 400_000,
    ("1080p", False): 200_000,
    ("1080p", True): 400_000,
    ("4k", False): 400_000,
    ("4k", True): 600_000,
}


def seed_prices() -> list[SimPrice]:
    """The ledger's seed prices (sql/ seed migration); a test keeps the two equal."""
    rows = [
        SimPrice(endpoint, res, None, rate, default_resolution="720p", effective_from=_JAN_2026)
        for endpoint in _SEEDANCE
        for res, rate in _SEEDANCE_RATES.items()
    ]
    rows += [
        SimPrice(
            "bytedance/seedance-2.0/fast/text-to-video",
            res,
            None,
            rate,
            default_resolution="720p",
            effective_from=_JAN_2026,
        )
        for res, rate in _FAST_RATES.items()
    ]
    rows += [
        SimPrice(
            "fal-ai/veo3.1", res, audio, rate, default_resolution="720p", effective_from=_JAN_2026
        )
        for (res, audio), rate in _VEO.items()
    ]
    rows += [
        SimPrice(
            "fal-ai/kling-video/v3/turbo/pro/text-to-video",
            None,
            None,
            140_000,
            effective_from=_JAN_2026,
        ),
        SimPrice(
            "fal-ai/kling-video/v2.5-turbo/pro/image-to-video",
            None,
            None,
            70_000,
            base_micros=350_000,
            base_seconds=5.0,
            effective_from=_JAN_2026,
        ),
    ]
    return rows


class PriceBook:
    """The simulator's own price list, with history (a change is a new row, as in the ledger)."""

    def __init__(self, rows: Iterable[SimPrice] | None = None) -> None:
        self.rows: list[SimPrice] = list(rows if rows is not None else seed_prices())

    def row_for(self, endpoint: str, inputs: dict[str, Any], at: float) -> SimPrice | None:
        """The row in force: like the ledger's rq_price_for (null columns match anything)."""
        candidates = []
        for row in self.rows:
            if row.endpoint != endpoint or row.effective_from > at:
                continue
            resolution = inputs.get("resolution") or row.default_resolution
            audio = inputs.get("generate_audio", True)
            if row.resolution is not None and row.resolution != resolution:
                continue
            if row.with_audio is not None and row.with_audio != bool(audio):
                continue
            candidates.append(row)
        if not candidates:
            return None
        return max(
            candidates,
            key=lambda r: (r.effective_from, r.resolution is not None, r.with_audio is not None),
        )

    def reference(self, endpoint: str, at: float) -> SimPrice | None:
        """The price fal's pricing API shows: default resolution, audio on."""
        return self.row_for(endpoint, {}, at)

    def endpoints(self) -> set[str]:
        return {row.endpoint for row in self.rows}

    def set_price(
        self, endpoint: str, unit_price: float, *, unit: str = SECOND, at: float | None = None
    ) -> list[SimPrice]:
        """fal changes an endpoint's price from `at`: every resolution/audio variant scales by
        the same ratio as the reference price (fal prices variants by a token formula)."""
        at = time.time() if at is None else at
        reference = self.reference(endpoint, at)
        new_rate = round(unit_price * 1_000_000)
        if reference is None:
            added = [SimPrice(endpoint, None, None, new_rate, effective_from=at, unit=unit)]
        else:
            ref_rate = reference.micros_per_second or new_rate or 1
            keys = {(r.resolution, r.with_audio) for r in self.rows if r.endpoint == endpoint}
            added = []
            for resolution, audio in sorted(keys, key=str):
                inputs: dict[str, Any] = {}
                if resolution is not None:
                    inputs["resolution"] = resolution
                if audio is not None:
                    inputs["generate_audio"] = audio
                current = self.row_for(endpoint, inputs, at)
                if current is None:
                    continue
                rate = (
                    new_rate
                    if current == reference
                    else round(current.micros_per_second * new_rate / ref_rate)
                )
                added.append(
                    replace(
                        current,
                        micros_per_second=rate,
                        base_micros=round(current.base_micros * new_rate / ref_rate),
                        effective_from=at,
                        unit=unit,
                    )
                )
        self.rows.extend(added)
        return added

    def pricing_entries(self, endpoint_ids: list[str], at: float) -> list[dict[str, Any]]:
        entries = []
        for endpoint in endpoint_ids:
            row = self.reference(endpoint, at)
            if row is not None:
                entries.append(
                    {
                        "endpoint_id": endpoint,
                        "unit_price": row.micros_per_second / 1_000_000,
                        "unit": row.unit,
                        "currency": "USD",
                    }
                )
        return entries


# ----- billing events ----------------------------------------------------------------------------


class BillingEvent(NamedTuple):
    """One billed request, as fal's billing-events API reports it (a tuple: cheap to make
    by the hundred thousand)."""

    request_id: str
    endpoint_id: str
    timestamp: float  # unix seconds (when the request finished)
    output_units: float
    unit_price: float  # USD per unit
    percent_discount: float | None
    cost_estimate_nano_usd: int
    visible_at: float = 0.0  # not on the wire: when the event shows up in the API
    #: the request's X-Fal-Tags as (key, value) pairs: what usage by tag groups on
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple[float, str]:
        return (self.timestamp, self.request_id)

    def as_json_text(self) -> str:
        """The same record as `as_json`, rendered directly (pages of 10,000 stay cheap)."""
        discount = "null" if self.percent_discount is None else repr(self.percent_discount)
        return (
            f'{{"request_id":{_quoted(self.request_id)},'
            f'"endpoint_id":{_quoted_name(self.endpoint_id)},'
            f'"timestamp":"{iso(self.timestamp)}","output_units":{self.output_units!r},'
            f'"unit_price":{self.unit_price!r},"percent_discount":{discount},'
            f'"cost_estimate_nano_usd":{self.cost_estimate_nano_usd}}}'
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "endpoint_id": self.endpoint_id,
            "timestamp": iso(self.timestamp),
            "output_units": self.output_units,
            "unit_price": self.unit_price,
            "percent_discount": self.percent_discount,
            "cost_estimate_nano_usd": self.cost_estimate_nano_usd,
        }


def _quoted(text: str) -> str:
    """A JSON string; the common plain case without json.dumps."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


#: endpoint ids repeat on every event: quoted once each
_quoted_name = functools.lru_cache(maxsize=1024)(_quoted)

_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


@functools.lru_cache(maxsize=4096)
def _iso_minute(minute: int) -> str:
    """'YYYY-MM-DDTHH:MM:' of a minute since the epoch (events of a page share a few)."""
    day, rest = divmod(minute, 1_440)
    hours, minutes = divmod(rest, 60)
    return f"{dt.date.fromordinal(_EPOCH_ORDINAL + day).isoformat()}T{hours:02d}:{minutes:02d}:"


def iso(wall: float) -> str:
    """RFC 3339 UTC with microseconds, e.g. 2026-10-01T00:00:05.250000Z (the same instant
    datetime.fromtimestamp gives: microseconds rounded half to even; cheap per call)."""
    frac, whole = math.modf(wall)
    micros = round(frac * 1_000_000)
    seconds = int(whole)
    if micros < 0:
        seconds, micros = seconds - 1, micros + 1_000_000
    elif micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    minute, secs = divmod(seconds, 60)
    return f"{_iso_minute(minute)}{secs:02d}.{micros:06d}Z"


def discounted_nanos(nanos: int, percent_discount: float | None) -> int:
    if not percent_discount:
        return nanos
    return round(nanos * (100.0 - percent_discount) / 100.0)


@dataclass(frozen=True)
class SyntheticBilling:
    """`count` billing events generated on demand (benchmarks: no memory per event).

    Event i: request id `f"{prefix}{i * stride:0{width}d}"`, timestamp evenly spread over
    [start, end), endpoint `endpoints[i % n]`, `4 + i % 12` seconds at `micros[i % n]` per
    second. Generations made with the same formula match it to the micro-dollar.
    """

    count: int
    start: float
    end: float
    prefix: str = "bench-"
    stride: int = 1
    width: int = 9
    endpoints: tuple[str, ...] = ("bytedance/seedance-2.0/text-to-video",)
    micros: tuple[int, ...] = (303_400,)

    @functools.cached_property
    def step(self) -> float:
        return (self.end - self.start) / self.count

    def event(self, i: int) -> BillingEvent:
        n = len(self.endpoints)
        seconds = 4 + i % 12
        rate = self.micros[i % n]
        return BillingEvent(
            self.prefix + str(i * self.stride).zfill(self.width),
            self.endpoints[i % n],
            self.start + i * self.step,
            float(seconds),
            rate / 1_000_000,
            None,
            seconds * rate * NANOS_PER_MICRO,
        )

    def iter_after(self, key: tuple[float, str] | None, start: float) -> Iterator[BillingEvent]:
        """Events in key order, strictly after `key` and not before `start`."""
        lo = start if key is None else max(start, key[0])
        first = max(0, math.floor((lo - self.start) / self.step) - 1) if self.step > 0 else 0
        for i in range(first, self.count):
            event = self.event(i)
            if event.timestamp < start or (key is not None and event.key <= key):
                continue
            yield event


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


# ----- the HTTP surface --------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"type": self.kind, "message": self.message}}, status_code=self.status
        )


def parse_time(name: str, value: str | None, default: float) -> float:
    if value is None or value == "":
        return default
    text = value.strip()
    try:
        if len(text) == 10:
            parsed = dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
        else:
            parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.UTC)
    except ValueError:
        message = f"{name}: not an ISO 8601 time: {value!r}"
        raise ApiError(422, "validation_error", message) from None
    return parsed.timestamp()


def encode_cursor(key: tuple[float, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps([repr(key[0]), key[1]]).encode()).decode()


def decode_cursor(value: str | None) -> tuple[float, str] | None:
    if not value:
        return None
    try:
        ts, request_id = json.loads(base64.urlsafe_b64decode(value.encode()))
        return float(ts), str(request_id)
    except (ValueError, TypeError):
        raise ApiError(422, "validation_error", "cursor: not a cursor this API returned") from None


def id_list(request: Request, name: str, *, required: bool) -> list[str]:
    """`a,b` or repeated parameters; 1-50 ids when given."""
    ids = [
        part.strip()
        for value in request.query_params.getlist(name)
        for part in value.split(",")
        if part.strip()
    ]
    if required and not ids:
        raise ApiError(422, "validation_error", f"{name}: at least one id is required")
    if len(ids) > MAX_IDS:
        raise ApiError(422, "validation_error", f"{name}: at most {MAX_IDS} ids (got {len(ids)})")
    return ids


def time_range(request: Request, now: float) -> tuple[float, float]:
    start = parse_time("start", request.query_params.get("start"), now - 86_400)
    end = parse_time("end", request.query_params.get("end"), now)
    if end <= start:
        raise ApiError(422, "validation_error", "end must be after start (end is exclusive)")
    if end - start > MAX_RANGE.total_seconds():
        raise ApiError(422, "validation_error", "the date range is capped at 90 days")
    return start, end


# handlers nested in one builder: module-level handlers are #20 part 4 (simulator)
def build_platform_app(book: BillingBook, keys: ApiKeys | None = None) -> Starlette:  # noqa: C901
    """fal's Platform API routes plus a control API under /_sim/billing.

    `keys`: the account's keys (the simulator home's); `book.config.admin_key` overrides
    the admin key. Without `keys` and without a configured admin key any key is accepted.
    """

    def authorize(request: Request) -> None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme != "Key" or not key.strip():
            raise ApiError(
                401, "authorization_error", "No credentials: send 'Authorization: Key <admin key>'"
            )
        admin = book.config.admin_key or (keys.admin_key if keys else None)
        if admin is None:
            return
        refusal = key_refusal(
            key.strip(), plain=keys.fal_key if keys else "", admin=admin, admin_needed=True
        )
        if refusal == 403:
            raise ApiError(403, "authorization_error", "This API needs an admin key")
        if refusal is not None:
            raise ApiError(401, "authorization_error", "Invalid admin key")

    def api(handler: Any) -> Any:
        async def wrapped(request: Request) -> Response:
            try:
                authorize(request)
                return await handler(request)
            except ApiError as exc:
                return exc.response()

        return wrapped

    async def pricing(request: Request) -> Response:
        endpoint_ids = id_list(request, "endpoint_id", required=True)
        prices = book.prices.pricing_entries(endpoint_ids, time.time())
        return JSONResponse({"prices": prices, "next_cursor": None, "has_more": False})

    def limit_of(request: Request) -> int:
        raw = request.query_params.get("limit")
        try:
            limit = int(raw) if raw else DEFAULT_LIMIT
        except ValueError:
            raise ApiError(422, "validation_error", f"limit: not an integer: {raw!r}") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise ApiError(422, "validation_error", f"limit: 1 to {MAX_LIMIT} (got {limit})")
        return limit

    async def billing_events(request: Request) -> Response:
        now = time.time()
        start, end = time_range(request, now)
        events, after = book.page(
            start,
            end,
            endpoint_ids=id_list(request, "endpoint_id", required=False),
            request_ids=id_list(request, "request_id", required=False),
            limit=limit_of(request),
            cursor=decode_cursor(request.query_params.get("cursor")),
            now=now,
        )
        cursor = json.dumps(encode_cursor(after) if after else None)
        text = (
            '{"billing_events":['
            + ",".join(e.as_json_text() for e in events)
            + f'],"next_cursor":{cursor},"has_more":{"true" if after else "false"}}}'
        )
        return Response(text, media_type="application/json")

    async def usage(request: Request) -> Response:
        now = time.time()
        start, end = time_range(request, now)
        endpoint_ids = set(id_list(request, "endpoint_id", required=False))
        expand = {
            part.strip()
            for value in request.query_params.getlist("expand")
            for part in value.split(",")
        } or {"time_series"}
        timeframe = request.query_params.get("timeframe", "day")
        if timeframe not in ("hour", "day", "week", "month"):
            raise ApiError(422, "validation_error", f"timeframe: unknown {timeframe!r}")
        group_by = request.query_params.get("group_by") or ""
        if group_by not in ("", "tag"):
            raise ApiError(422, "validation_error", f"group_by: expected 'tag', got {group_by!r}")
        tag_filters = tag_filters_of(request)
        if (group_by or tag_filters) and not book.config.usage_by_tag:
            raise ApiError(
                400,
                "feature_not_enabled",
                "usage by tag is not enabled for this account (fal enables it on request)",
            )
        if group_by:
            return JSONResponse(
                usage_by_tag(book, start, end, now, endpoint_ids, request, tag_filters)
            )
        totals: dict[str, list[float]] = {}
        buckets: dict[tuple[str, str], list[float]] = {}
        for event in book.iter_events(start, end, None, now):
            if endpoint_ids and event.endpoint_id not in endpoint_ids:
                continue
            if not tagged_with(event, tag_filters):
                continue
            total = totals.setdefault(event.endpoint_id, [0.0, 0])
            total[0] += event.output_units
            total[1] += event.cost_estimate_nano_usd
            bucket = bucket_of(event.timestamp, timeframe)
            slot = buckets.setdefault((bucket, event.endpoint_id), [0.0, 0])
            slot[0] += event.output_units
            slot[1] += event.cost_estimate_nano_usd

        def item(endpoint: str, quantity: float, nanos: int) -> dict[str, Any]:
            return {
                "endpoint_id": endpoint,
                "unit": SECOND,
                "quantity": round(quantity, 6),
                "cost": nanos / 1e9,
                "cost_nano_usd": nanos,
                "currency": "USD",
            }

        body: dict[str, Any] = {"next_cursor": None, "has_more": False}
        if "summary" in expand:
            body["summary"] = [item(k, v[0], int(v[1])) for k, v in sorted(totals.items())]
        if "time_series" in expand:
            series: dict[str, list[dict[str, Any]]] = {}
            for (bucket, endpoint), (quantity, nanos) in sorted(buckets.items()):
                series.setdefault(bucket, []).append(item(endpoint, quantity, int(nanos)))
            body["time_series"] = [{"bucket": b, "results": r} for b, r in series.items()]
        return JSONResponse(body)

    async def requests_by_endpoint(request: Request) -> Response:
        now = time.time()
        endpoint_ids = id_list(request, "endpoint_id", required=True)
        request_ids = id_list(request, "request_id", required=False)
        default_window = MAX_RANGE.total_seconds() if request_ids else DEFAULT_REQUEST_WINDOW
        start = parse_time("start", request.query_params.get("start"), now - default_window)
        end = parse_time("end", request.query_params.get("end"), now)
        if end <= start:
            raise ApiError(422, "validation_error", "end must be after start (end is exclusive)")
        if end - start > MAX_RANGE.total_seconds():
            raise ApiError(422, "validation_error", "the date range is capped at 90 days")
        statuses = {
            part.strip()
            for value in request.query_params.getlist("status")
            for part in value.split(",")
            if part.strip()
        }
        if unknown := statuses - set(REQUEST_STATUSES):
            message = f"status: expected {'|'.join(REQUEST_STATUSES)}, got {sorted(unknown)}"
            raise ApiError(422, "validation_error", message)
        raw = request.query_params.get("limit")
        try:
            limit = int(raw) if raw else MAX_REQUEST_PAGE
        except ValueError:
            raise ApiError(422, "validation_error", f"limit: not an integer: {raw!r}") from None
        if not 1 <= limit <= MAX_REQUEST_PAGE:
            message = f"limit: 1 to {MAX_REQUEST_PAGE} (got {limit})"
            raise ApiError(422, "validation_error", message)
        expand = {
            part.strip()
            for value in request.query_params.getlist("expand")
            for part in value.split(",")
        }
        items, after = book.request_page(
            endpoint_ids,
            start,
            end,
            statuses=statuses,
            request_ids=request_ids,
            limit=limit,
            cursor=decode_cursor(request.query_params.get("cursor")),
            payloads="payloads" in expand,
        )
        return JSONResponse(
            {
                "items": items,
                "next_cursor": encode_cursor(after) if after else None,
                "has_more": after is not None,
            }
        )

    # -- control API (tests, operators, benchmarks; no fal equivalent)

    async def control(handler: Any, request: Request) -> Response:
        try:
            return await handler(request)
        except (ValueError, ValidationError, KeyError, TypeError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)

    async def get_config(_: Request) -> Response:
        return JSONResponse(book.config.public())

    async def patch_config(request: Request) -> Response:
        async def go(request: Request) -> Response:
            changes = await request.json()
            book.config = BillingConfig.model_validate({**book.config.model_dump(), **changes})
            return JSONResponse(book.config.public())

        return await control(go, request)

    async def reset(request: Request) -> Response:
        async def go(request: Request) -> Response:
            raw = await request.body()
            book.reset(BillingConfig.model_validate(json.loads(raw) if raw else {}))
            return JSONResponse(book.config.public())

        return await control(go, request)

    async def get_prices(_: Request) -> Response:
        return JSONResponse([price_json(row) for row in book.prices.rows])

    async def put_price(request: Request) -> Response:
        async def go(request: Request) -> Response:
            body = await request.json()
            added = book.prices.set_price(
                str(body["endpoint_id"]),
                float(body["unit_price"]),
                unit=str(body.get("unit", SECOND)),
                at=float(body["at"]) if body.get("at") is not None else None,
            )
            return JSONResponse([price_json(row) for row in added])

        return await control(go, request)

    async def post_events(request: Request) -> Response:
        async def go(request: Request) -> Response:
            body = await request.json()
            events = [event_from_json(item) for item in body["billing_events"]]
            return JSONResponse({"added": book.add(events)})

        return await control(go, request)

    async def post_synthetic(request: Request) -> Response:
        async def go(request: Request) -> Response:
            body = await request.json()
            for name in ("endpoints", "micros"):
                if name in body:
                    body[name] = tuple(body[name])
            run = SyntheticBilling(**body)
            book.add_synthetic(run)
            return JSONResponse({"added": run.count})

        return await control(go, request)

    async def list_events(_: Request) -> Response:
        return JSONResponse(
            [
                {**e.as_json(), "visible_at": iso(e.visible_at), "tags": dict(e.tags)}
                for e in book.events()
            ]
        )

    return Starlette(
        routes=[
            Route("/v1/models/pricing", api(pricing)),
            Route("/v1/models/billing-events", api(billing_events)),
            Route("/v1/models/usage", api(usage)),
            Route("/v1/models/requests/by-endpoint", api(requests_by_endpoint)),
            Route("/_sim/billing/config", get_config, methods=["GET"]),
            Route("/_sim/billing/config", patch_config, methods=["PATCH", "PUT"]),
            Route("/_sim/billing/reset", reset, methods=["POST"]),
            Route("/_sim/billing/prices", get_prices, methods=["GET"]),
            Route("/_sim/billing/prices", put_price, methods=["PUT", "POST"]),
            Route("/_sim/billing/events", list_events, methods=["GET"]),
            Route("/_sim/billing/events", post_events, methods=["POST"]),
            Route("/_sim/billing/synthetic", post_synthetic, methods=["POST"]),
        ]
    )


def tag_filters_of(request: Request) -> dict[str, str]:
    """`tag=key:value` (repeatable, or comma-separated): only requests carrying every one."""
    filters: dict[str, str] = {}
    for value in request.query_params.getlist("tag"):
        for part in value.split(","):
            if not part.strip():
                continue
            key, sep, tag_value = part.strip().partition(":")
            if not sep or not key:
                raise ApiError(422, "validation_error", f"tag: expected key:value, got {part!r}")
            filters[key] = tag_value
    return filters


def tagged_with(event: BillingEvent, filters: dict[str, str]) -> bool:
    if not filters:
        return True
    tags = dict(event.tags)
    return all(tags.get(key) == value for key, value in filters.items())


def usage_by_tag(
    book: BillingBook,
    start: float,
    end: float,
    now: float,
    endpoint_ids: set[str],
    request: Request,
    tag_filters: dict[str, str],
) -> dict[str, Any]:
    """`group_by=tag&tag_key=k`: quantity, cost and request count per (endpoint, value of
    tag k) over the range; requests without tag k are one group with `tag_value` null.
    Without `tag_key`, one group per (endpoint, key, value) of every tag a request carried
    (a request counts once under each of its tags). Unverified shape: docs/simulator.md."""
    wanted_key = request.query_params.get("tag_key") or None
    groups: dict[tuple[str, str | None, str | None], list[float]] = {}
    for event in book.iter_events(start, end, None, now):
        if endpoint_ids and event.endpoint_id not in endpoint_ids:
            continue
        if not tagged_with(event, tag_filters):
            continue
        tags = dict(event.tags)
        if wanted_key is not None:
            pairs: list[tuple[str | None, str | None]] = [(wanted_key, tags.get(wanted_key))]
        else:
            pairs = list(tags.items()) or [(None, None)]
        for key, value in pairs:
            slot = groups.setdefault((event.endpoint_id, key, value), [0.0, 0, 0])
            slot[0] += event.output_units
            slot[1] += event.cost_estimate_nano_usd
            slot[2] += 1
    summary = [
        {
            "endpoint_id": endpoint,
            "tag_key": key,
            "tag_value": value,
            "unit": SECOND,
            "quantity": round(quantity, 6),
            "requests": int(requests),
            "cost": nanos / 1e9,
            "cost_nano_usd": int(nanos),
            "currency": "USD",
        }
        for (endpoint, key, value), (quantity, nanos, requests) in sorted(
            groups.items(), key=lambda item: (item[0][0], item[0][1] or "", item[0][2] or "")
        )
    ]
    return {"summary": summary, "next_cursor": None, "has_more": False}


def bucket_of(wall: float, timeframe: str) -> str:
    moment = dt.datetime.fromtimestamp(wall, dt.UTC)
    if timeframe == "hour":
        moment = moment.replace(minute=0, second=0, microsecond=0)
    elif timeframe == "day":
        moment = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    elif timeframe == "week":
        moment = (moment - dt.timedelta(days=moment.weekday())).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
    else:
        moment = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def price_json(row: SimPrice) -> dict[str, Any]:
    return {**row.__dict__, "effective_from": iso(row.effective_from)}


def event_from_json(item: dict[str, Any]) -> BillingEvent:
    """A hand-made event (control API): fal's field names; `visible_at` optional."""
    timestamp = parse_time("timestamp", item.get("timestamp"), time.time())
    units = float(item["output_units"])
    unit_price = float(item["unit_price"])
    discount = item.get("percent_discount")
    nanos = item.get("cost_estimate_nano_usd")
    if nanos is None:
        nanos = discounted_nanos(round(units * unit_price * 1e9), discount)
    return BillingEvent(
        request_id=str(item["request_id"]),
        endpoint_id=str(item["endpoint_id"]),
        timestamp=timestamp,
        output_units=units,
        unit_price=unit_price,
        percent_discount=discount,
        cost_estimate_nano_usd=int(nanos),
        visible_at=parse_time("visible_at", item.get("visible_at"), timestamp),
        tags=tuple(sorted((str(k), str(v)) for k, v in (item.get("tags") or {}).items())),
    )


# ----- serving -----------------------------------------------------------------------------------


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


def platform_env(host: str, port: int) -> dict[str, str]:
    """What a client needs besides the simulator's own env (same certificate bundle)."""

    return {"RENDERQUEUE_FAL_API_URL": f"https://{client_host(host)}:{port}/v1"}


class PlatformServer:
    """The Platform API on its own TLS port (the simulator's certificate), in a thread."""

    def __init__(
        self,
        home: Path,
        book: BillingBook,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
    ) -> None:

        self.home = Path(home).expanduser().resolve()
        self.book = book
        self.host = host
        self.cert, self.key, self.bundle = ensure_ca_bundle(self.home)
        self.sock = bind_socket(host, port)
        self.port: int = self.sock.getsockname()[1]
        self.keys = ApiKeys.load_or_create(self.home / "simulator")
        self.app = build_platform_app(book, self.keys)
        self._uvicorn = uvicorn.Server(
            uvicorn.Config(
                self.app,
                ssl_certfile=str(self.cert),
                ssl_keyfile=str(self.key),
                log_level=log_level,
                access_log=False,
                loop="asyncio",
                lifespan="off",
                timeout_graceful_shutdown=1,
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def api_url(self) -> str:
        return platform_env(self.host, self.port)["RENDERQUEUE_FAL_API_URL"]

    @property
    def base_url(self) -> str:
        return self.api_url.removesuffix("/v1")

    def start(self, timeout: float = 15.0) -> PlatformServer:
        def run() -> None:
            try:
                self._uvicorn.run(sockets=[self.sock])
            finally:
                self.sock.close()

        self._thread = threading.Thread(target=run, name=f"fal-platform:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fal Platform API simulator on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._uvicorn.force_exit = True
                self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> PlatformServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
