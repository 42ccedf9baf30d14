"""The Platform API's HTTP surface: fal's pricing, billing events, usage and request
list, plus a control API under /_sim/billing. Handlers read the book and the account's
keys from `app.state`."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from renderqueue_pipeline.simulator.keys import ApiKeys, key_refusal
from renderqueue_pipeline.simulator.platform.book import BillingBook, BillingConfig
from renderqueue_pipeline.simulator.platform.events import BillingEvent, discounted_nanos, iso
from renderqueue_pipeline.simulator.platform.prices import SECOND, SimPrice
from renderqueue_pipeline.simulator.platform.synthetic import SyntheticBilling

MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1_000
MAX_IDS = 50
MAX_RANGE = dt.timedelta(days=90)
#: the request list: at most 100 a page, a 24 h default window (90 days with request ids)
MAX_REQUEST_PAGE = 100
DEFAULT_REQUEST_WINDOW = 86_400.0
REQUEST_STATUSES = ("success", "error", "user_error")


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


def authorize(request: Request) -> None:
    """Raise ApiError unless the request carries the account's admin key."""
    book, keys = request.app.state.book, request.app.state.keys
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
    """A Platform API route: the admin key checked, ApiError answered as fal does."""

    async def wrapped(request: Request) -> Response:
        try:
            authorize(request)
            return await handler(request)
        except ApiError as exc:
            return exc.response()

    return wrapped


async def pricing(request: Request) -> Response:
    book = _book(request)
    endpoint_ids = id_list(request, "endpoint_id", required=True)
    prices = book.prices.pricing_entries(endpoint_ids, time.time())
    return JSONResponse({"prices": prices, "next_cursor": None, "has_more": False})


def limit_of(request: Request) -> int:
    """The `limit` parameter of billing events (1 to 10,000; 1,000 when absent)."""
    raw = request.query_params.get("limit")
    try:
        limit = int(raw) if raw else DEFAULT_LIMIT
    except ValueError:
        raise ApiError(422, "validation_error", f"limit: not an integer: {raw!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(422, "validation_error", f"limit: 1 to {MAX_LIMIT} (got {limit})")
    return limit


async def billing_events(request: Request) -> Response:
    book = _book(request)
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
    book = _book(request)
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
        return JSONResponse(usage_by_tag(book, start, end, now, endpoint_ids, request, tag_filters))
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
    book = _book(request)
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
    """A control-API call: a bad body or value is a 422 naming it."""
    try:
        return await handler(request)
    except (ValueError, ValidationError, KeyError, TypeError) as exc:
        return JSONResponse({"detail": str(exc)}, status_code=422)


async def get_config(request: Request) -> Response:
    book = _book(request)
    return JSONResponse(book.config.public())


async def patch_config(request: Request) -> Response:
    book = _book(request)

    async def go(request: Request) -> Response:
        changes = await request.json()
        book.config = BillingConfig.model_validate({**book.config.model_dump(), **changes})
        return JSONResponse(book.config.public())

    return await control(go, request)


async def reset(request: Request) -> Response:
    book = _book(request)

    async def go(request: Request) -> Response:
        raw = await request.body()
        book.reset(BillingConfig.model_validate(json.loads(raw) if raw else {}))
        return JSONResponse(book.config.public())

    return await control(go, request)


async def get_prices(request: Request) -> Response:
    book = _book(request)
    return JSONResponse([price_json(row) for row in book.prices.rows])


async def put_price(request: Request) -> Response:
    book = _book(request)

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
    book = _book(request)

    async def go(request: Request) -> Response:
        body = await request.json()
        events = [event_from_json(item) for item in body["billing_events"]]
        return JSONResponse({"added": book.add(events)})

    return await control(go, request)


async def post_synthetic(request: Request) -> Response:
    book = _book(request)

    async def go(request: Request) -> Response:
        body = await request.json()
        for name in ("endpoints", "micros"):
            if name in body:
                body[name] = tuple(body[name])
        run = SyntheticBilling(**body)
        book.add_synthetic(run)
        return JSONResponse({"added": run.count})

    return await control(go, request)


async def list_events(request: Request) -> Response:
    book = _book(request)
    return JSONResponse(
        [
            {**e.as_json(), "visible_at": iso(e.visible_at), "tags": dict(e.tags)}
            for e in book.events()
        ]
    )


def build_platform_app(book: BillingBook, keys: ApiKeys | None = None) -> Starlette:
    """fal's Platform API routes plus a control API under /_sim/billing.

    `keys`: the account's keys (the simulator home's); `book.config.admin_key` overrides
    the admin key. Without `keys` and without a configured admin key any key is accepted.
    """
    app = Starlette(
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
    app.state.book = book
    app.state.keys = keys
    return app


def _book(request: Request) -> BillingBook:
    """The billing book this app serves (`build_platform_app` puts it on `app.state`)."""
    return request.app.state.book


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
