"""The simulator's HTTP surface: fal's queue API, a sync run API, a CDN, JWKS, fal's
`delete_io` and a control API.

Wire shapes follow shared/fal-wire.md; anything fal-client reads is present with
the type it expects, so unmodified fal-client cannot tell this from fal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from renderqueue_pipeline.simulator.config import SimConfig
from renderqueue_pipeline.simulator.engine import TERMINAL, Engine, Lifecycle, SimRequest
from renderqueue_pipeline.simulator.keys import ApiKeys, UrlSigner, WebhookSigner, key_refusal
from renderqueue_pipeline.simulator.models import OutputFile, file_chunks, validate_inputs

NAMESPACES = ("workflows", "comfy")


def _nginx(code: int, reason: str) -> str:
    return (
        f"<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
        f"<center><h1>{code} {reason}</h1></center>\r\n"
        "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )


EDGE_REASONS = {502: "Bad Gateway", 503: "Service Temporarily Unavailable", 504: "Gateway Time-out"}
CONTENT_TYPES = {".mp4": "video/mp4", ".jpeg": "image/jpeg", ".jpg": "image/jpeg"}
LIFECYCLE_HEADER = "x-fal-object-lifecycle-preference"
TIMEOUT_HEADER = "x-fal-request-timeout"
PRIORITY_HEADER = "x-fal-queue-priority"
HINT_HEADER = "x-fal-runner-hint"
STORE_IO_HEADER = "x-fal-store-io"
TAGS_HEADER = "x-fal-tags"
#: fal's documented limits of X-Fal-Tags
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE, MAX_TAGS_BYTES = 10, 64, 256, 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Unreachable(Response):
    """fal out of reach: headers promise a body that never comes, then the connection closes.

    The client sees a transport error (httpx RemoteProtocolError), as when fal cannot be
    reached, without the test closing and rebinding the simulator's socket.
    """

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"1"), (b"connection", b"close")],
            }
        )
        # returning without the promised byte: uvicorn closes the connection


def _json(
    body: Any, status: int = 200, request_id: str | None = None, **headers: str
) -> JSONResponse:
    extra = {k.replace("_", "-"): v for k, v in headers.items()}
    if request_id:
        extra["x-fal-request-id"] = request_id
    return JSONResponse(body, status_code=status, headers=extra or None)


def _split_app(path: str) -> tuple[str, list[str]] | None:
    """Split `[namespace/]owner/app/rest...` into ("[ns/]owner/app", rest)."""
    parts = [p for p in path.strip("/").split("/") if p]
    prefix = ""
    if parts and parts[0] in NAMESPACES:
        prefix, parts = parts[0] + "/", parts[1:]
    if len(parts) < 2:
        return None
    return f"{prefix}{parts[0]}/{parts[1]}", parts[2:]


class BadHeader(ValueError):
    """A request header fal would refuse (answered 422 naming the header)."""


def parse_lifecycle(headers: Any, config: SimConfig) -> Lifecycle:
    """The request's lifecycle headers; the configured defaults where it sent none."""
    lifetime = config.cdn_default_lifetime
    raw = headers.get(LIFECYCLE_HEADER)
    if raw is not None:
        try:
            preference = json.loads(raw)
            seconds = preference["expiration_duration_seconds"]
        except (ValueError, KeyError, TypeError):
            raise BadHeader(
                "X-Fal-Object-Lifecycle-Preference: expected "
                '{"expiration_duration_seconds": N} (N seconds, or null for no expiry)'
            ) from None
        if seconds is not None and (
            isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0
        ):
            raise BadHeader("X-Fal-Object-Lifecycle-Preference: seconds must be positive")
        lifetime = None if seconds is None else float(seconds)
    start_timeout = None
    if (raw := headers.get(TIMEOUT_HEADER)) is not None:
        try:
            start_timeout = float(raw)
        except ValueError:
            raise BadHeader("X-Fal-Request-Timeout: expected seconds") from None
        if start_timeout <= 0:
            raise BadHeader("X-Fal-Request-Timeout: must be positive")
    priority = headers.get(PRIORITY_HEADER, "normal")
    if priority not in ("normal", "low"):
        raise BadHeader("X-Fal-Queue-Priority: expected 'normal' or 'low'")
    store_io = headers.get(STORE_IO_HEADER, "1").strip() != "0"
    return Lifecycle(lifetime, start_timeout, priority, headers.get(HINT_HEADER), store_io)


def parse_tags(headers: Any) -> dict[str, str]:
    """X-Fal-Tags `k=v,k=v` as sent (values kept exactly), within fal's documented limits."""
    raw = headers.get(TAGS_HEADER)
    if raw is None or not raw.strip():
        return {}
    if len(raw.encode()) > MAX_TAGS_BYTES:
        raise BadHeader(f"X-Fal-Tags: more than {MAX_TAGS_BYTES} bytes")
    tags: dict[str, str] = {}
    for pair in raw.split(","):
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise BadHeader("X-Fal-Tags: expected key=value pairs separated by commas")
        if key.lower().startswith("fal."):
            raise BadHeader(f"X-Fal-Tags: the 'fal.' prefix is reserved ({key!r})")
        if len(key) > MAX_TAG_KEY or len(value) > MAX_TAG_VALUE:
            raise BadHeader(f"X-Fal-Tags: key {MAX_TAG_KEY} / value {MAX_TAG_VALUE} chars at most")
        tags[key] = value
    if len(tags) > MAX_TAGS:
        raise BadHeader(f"X-Fal-Tags: at most {MAX_TAGS} tags")
    return tags


def parse_range(header: str | None, size: int) -> tuple[int, int] | Literal[False] | None:
    """(first, last) of a single `bytes=` range; None for no range; False if unsatisfiable."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None  # multi-range or garbage: RFC 9110 lets us ignore it and send all
    first_text, last_text = match.groups()
    if not first_text:  # suffix: the last N bytes
        length = int(last_text)
        if length == 0 or size == 0:
            return False
        return max(0, size - length), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if first >= size or last < first:
        return False
    return first, min(last, size - 1)


def _engine(request: Request) -> Engine:
    """The queue engine this app serves (`build_app` puts it on `app.state`)."""
    return request.app.state.engine


def authorized(request: Request, *, admin: bool = False) -> JSONResponse | None:
    """None when the request's key may make this call; else fal's 401/403 answer."""
    engine = _engine(request)
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme != "Key" or not key.strip():
        return _json({"detail": "No credentials: send 'Authorization: Key <FAL_KEY>'"}, 401)
    refusal = key_refusal(
        key.strip(),
        plain=engine.config.fal_key or request.app.state.api_keys.fal_key,
        admin=engine.config.admin_key or request.app.state.api_keys.admin_key,
        admin_needed=admin,
    )
    if refusal == 403:
        return _json({"detail": "This call needs an admin key (FAL_ADMIN_KEY)"}, 403)
    if refusal is not None:
        return _json({"detail": "Invalid credentials"}, 401)
    return None


def fault_response(fault: str, request_id: str | None = None) -> Response:
    """The answer of an injected fault, shaped as fal's edge or fal itself sends it."""
    if fault == "unreachable":
        return _Unreachable()
    if fault == "429":
        return _json({"detail": "Too many requests; slow down"}, 429)
    if fault in ("502", "503", "504"):  # the edge (nginx): fal-client retries these
        code = int(fault)
        return Response(_nginx(code, EDGE_REASONS[code]), code, media_type="text/html")
    # fal's own 5xx: JSON, named request, not retried by fal-client
    return Response(
        '{"detail":"Internal server error","error_type":"internal_error"}',
        status_code=500,
        media_type="application/json",
        headers={"x-fal-request-id": request_id or "", "x-fal-error-type": "internal_error"},
    )


async def read_inputs(request: Request) -> Any:
    """The JSON body ({} when empty); None when it is not JSON (answered 422)."""
    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return None


def queue_urls(base: str, app_path: str, request_id: str) -> dict[str, str]:
    """A request's response, status and cancel URLs (owner/app only, as fal builds them)."""
    response_url = f"{base}/{app_path}/requests/{request_id}"
    return {
        "response_url": response_url,
        "status_url": f"{response_url}/status",
        "cancel_url": f"{response_url}/cancel",
    }


async def submit(request: Request, endpoint: str, app_path: str) -> Response:
    engine = _engine(request)
    epoch = engine.epoch
    engine.submits_in_flight += 1
    engine.submits_in_flight_peak = max(engine.submits_in_flight_peak, engine.submits_in_flight)
    try:
        return await enqueue(request, endpoint, app_path)
    finally:
        if engine.epoch == epoch:  # a reset since has already forgotten this call
            engine.submits_in_flight -= 1


async def enqueue(request: Request, endpoint: str, app_path: str) -> Response:
    engine = _engine(request)
    if engine.config.api_unreachable:
        return _Unreachable()
    fault = engine.api_fault()
    if fault and fault != "500":
        return fault_response(fault)
    try:
        lifecycle = parse_lifecycle(request.headers, engine.config)
        tags = parse_tags(request.headers)
    except BadHeader as exc:
        return _json({"detail": str(exc)}, 422)
    inputs = await read_inputs(request)
    if engine.validation_stage(endpoint) == "submit" or inputs is None:
        errors = validate_inputs(endpoint, inputs)
        if errors:
            return _json({"detail": errors}, 422)
    webhook_url = request.query_params.get("fal_webhook") or None
    base = str(request.base_url).rstrip("/")
    req = engine.create(
        endpoint, app_path, inputs, webhook_url, base, lifecycle=lifecycle, tags=tags
    )
    if req.decisions.early and webhook_url:
        engine.refresh(req)
        await engine.deliver_now(req)
    if req.decisions.submit_latency > 0:
        await asyncio.sleep(req.decisions.submit_latency)
    if engine.answer_lost(req):
        # enqueued, but the answer never reaches the caller: the edge times out (504),
        # which fal-client retries, so the same submit reaches fal again
        return fault_response("504")
    if fault == "500":
        # the worst case on purpose: fal accepted the request but the caller sees an error
        return fault_response(fault, req.request_id)
    position = engine.queue_position(req) if engine.refresh(req) == "queued" else 0
    body = {
        "status": "IN_QUEUE",
        "request_id": req.request_id,
        "gateway_request_id": req.gateway_request_id,
        **queue_urls(base, app_path, req.request_id),
        "queue_position": position,
    }
    return _json(body, 200, req.request_id)


def find(engine: Engine, app_path: str, request_id: str) -> SimRequest | None:
    req = engine.requests.get(request_id)
    if req is None or req.app_path != app_path or req.sync:
        return None
    return req


async def status(request: Request, req: SimRequest) -> Response:
    engine = _engine(request)
    latency = engine.config.dist("status_latency").sample(request.app.state.latency_rng)
    if latency > 0:
        await asyncio.sleep(latency)
    with_logs = request.query_params.get("logs", "0").lower() in ("1", "true", "yes")
    state = engine.refresh(req)
    base = str(request.base_url).rstrip("/")
    common = {"request_id": req.request_id, **queue_urls(base, req.app_path, req.request_id)}
    logs = engine.logs(req) if with_logs else None
    if state == "queued":
        body = {"status": "IN_QUEUE", "queue_position": engine.queue_position(req), **common}
        return _json(body, 202, req.request_id)
    if state == "in_progress":
        return _json({"status": "IN_PROGRESS", "logs": logs, **common}, 202, req.request_id)
    body = {
        "status": "COMPLETED",
        "logs": logs,
        "metrics": {"inference_time": round(req.decisions.run_time, 3)}
        if req.started_wall is not None
        else {},
        **common,
    }
    if state != "completed":
        error = req.error_body()
        body["error"] = f"Invalid status code: {req.http_status}"
        if "error_type" in error:
            body["error_type"] = error["error_type"]
    return _json(body, 200, req.request_id)


async def result(engine: Engine, req: SimRequest) -> Response:
    state = engine.refresh(req)
    if state not in TERMINAL:
        return _json({"detail": "Request is still in progress"}, 400, req.request_id)
    if engine.result_expired(req):
        return _json({"detail": "Request result has expired"}, 404, req.request_id)
    if state == "completed":
        return _json(engine.output(req), 200, req.request_id)
    body = req.error_body()
    headers: dict[str, str] = {}
    if "error_type" in body:
        headers["x_fal_error_type"] = body["error_type"]
    if req.ending == "start_timeout":
        headers["x_fal_request_timeout_type"] = "user"
    return _json(body, req.http_status, req.request_id, **headers)


async def queue(request: Request) -> Response:
    engine = _engine(request)
    split = _split_app(request.path_params["path"])
    if split is None:
        return _json({"detail": "Not found: expected /{owner}/{app}[/path]"}, 404)
    app_path, rest = split
    if denied := authorized(request):
        return denied
    if request.method == "POST":
        return await submit(request, request.path_params["path"].strip("/"), app_path)
    if len(rest) < 2 or rest[0] != "requests" or len(rest) > 3:
        detail = "Not found: status, result and cancel URLs use only /{owner}/{app}/requests/{id}"
        return _json({"detail": detail}, 404)
    request_id, action = rest[1], (rest[2] if len(rest) == 3 else "")
    if engine.config.api_unreachable:
        return _Unreachable()
    fault = engine.api_fault()
    if fault:
        return fault_response(fault, request_id)
    req = find(engine, app_path, request_id)
    if request.method == "PUT" and action == "cancel":
        if engine.config.cancel_fault != "none":
            return fault_response(engine.config.cancel_fault, request_id)
        if req is None:
            return _json({"status": "NOT_FOUND"}, 404)
        outcome = engine.cancel(req)
        code = 202 if outcome == "CANCELLATION_REQUESTED" else 400
        return _json({"status": outcome}, code, req.request_id)
    if request.method != "GET" or action not in ("", "status"):
        return _json({"detail": "Method not allowed"}, 405)
    if req is None:
        return _json({"detail": f"Request {request_id} not found"}, 404)
    return await status(request, req) if action == "status" else await result(engine, req)


async def run_sync(request: Request) -> Response:
    """fal.run's synchronous API (FAL_RUN_HOST=<host>/_run): wait, then return the output."""
    engine = _engine(request)
    endpoint = request.path_params["path"].strip("/")
    split = _split_app(endpoint)
    if split is None:
        return _json({"detail": "Not found: expected /{owner}/{app}[/path]"}, 404)
    if denied := authorized(request):
        return denied
    fault = engine.api_fault()
    if fault:
        return fault_response(fault)
    try:
        lifecycle = parse_lifecycle(request.headers, engine.config)
        tags = parse_tags(request.headers)
    except BadHeader as exc:
        return _json({"detail": str(exc)}, 422)
    inputs = await read_inputs(request)
    errors = validate_inputs(endpoint, inputs)
    if errors:
        return _json({"detail": errors}, 422)
    base = str(request.base_url).rstrip("/")
    req = engine.create(
        endpoint, split[0], inputs, None, base, lifecycle=lifecycle, sync=True, tags=tags
    )
    await req.done.wait()
    if req.state != "completed":
        return await result(engine, req)
    return _json(engine.output(req), 200, req.request_id)


async def delete_io(request: Request) -> Response:
    """fal's `PUT /requests/delete_io/{request_id}` (admin key): payloads and output files."""
    engine = _engine(request)
    if denied := authorized(request, admin=True):
        return denied
    req = engine.requests.get(request.path_params["request_id"])
    if req is None:
        return _json({"detail": "Request not found"}, 404)
    base = str(request.base_url).rstrip("/")
    return _json({"CDN_DELETE_RESULTS": engine.delete_io(req, base)})


def serve_file(request: Request, file: OutputFile, headers: dict[str, str]) -> Response:
    """HEAD, GET and single byte ranges, streamed block by block."""
    content_type = file.content_type
    headers = {**headers, "accept-ranges": "bytes"}
    wanted = parse_range(request.headers.get("range"), file.file_size)
    if wanted is False:
        headers["content-range"] = f"bytes */{file.file_size}"
        return Response(status_code=416, headers=headers)
    if wanted is None:
        first, last, code = 0, file.file_size - 1, 200
    else:
        first, last = wanted
        code = 206
        headers["content-range"] = f"bytes {first}-{last}/{file.file_size}"
    headers["content-length"] = str(last - first + 1)
    if request.method == "HEAD":
        return Response(status_code=code, headers=headers, media_type=content_type)
    return StreamingResponse(
        file_chunks(file, first, last), code, headers=headers, media_type=content_type
    )


async def cdn(request: Request) -> Response:
    engine = _engine(request)
    file_id, name = request.path_params["file_id"], request.path_params["name"]
    path = f"/files/b/{file_id}/{name}"
    if "sig" in request.query_params:  # a URL minted in `signed` mode
        return signed_cdn(request, file_id, name, path)
    entry = engine.cdn_file(path)
    if entry is None or not entry.alive(time.time()):
        return Response("Not Found", status_code=404, media_type="text/plain")
    headers = {
        "etag": f'"{entry.file.file_id}-{entry.file.file_size}"',
        "cache-control": "public, max-age=31536000, immutable",
        "last-modified": _http_date(entry.created_wall),
    }
    return serve_file(request, entry.file, headers)


def signed_cdn(request: Request, file_id: str, name: str, path: str) -> Response:
    try:
        size = int(request.query_params["size"])
        expires = int(request.query_params["exp"])
        sig = request.query_params["sig"]
        millis = int(request.query_params["ms"]) if "ms" in request.query_params else None
    except (KeyError, ValueError):
        return Response("Forbidden: unsigned URL", status_code=403)
    signed = f"{path}\n{size}" if millis is None else f"{path}\n{size}\n{millis}"
    if not request.app.state.url_signer.verify(signed, expires, sig):
        return Response("Forbidden: bad signature", status_code=403)
    if time.time() > expires:
        return Response("Forbidden: URL expired", status_code=403)
    content_type = CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
    seconds = None if millis is None else millis / 1000
    file = OutputFile(file_id, name, content_type, size, seconds)
    headers = {"etag": f'"{file_id}-{size}"', "cache-control": "private, max-age=0"}
    return serve_file(request, file, headers)


async def jwks(request: Request) -> Response:
    return JSONResponse(
        request.app.state.signer.jwks(), headers={"cache-control": "public, max-age=86400"}
    )


# ----- control API (tests and operators; no fal equivalent) --------------------------------


async def health(request: Request) -> Response:
    engine = _engine(request)
    return _json(
        {
            "ok": True,
            "seed": engine.config.seed,
            "requests": len(engine.requests),
            "files": len(engine.files),
            "api_calls": engine.api_calls,
            "api_faults": engine.api_faults,
            "pending_tasks": len(engine.tasks),
            "submits_in_flight": engine.submits_in_flight,
            "submits_in_flight_peak": engine.submits_in_flight_peak,
        }
    )


async def get_config(request: Request) -> Response:
    engine = _engine(request)
    return _json(engine.config.public())


async def patch_config(request: Request) -> Response:
    engine = _engine(request)
    try:
        changes = await request.json()
        engine.update_config(SimConfig.model_validate({**engine.config.model_dump(), **changes}))
    except (ValueError, ValidationError) as exc:
        return _json({"detail": str(exc)}, 422)
    return _json(engine.config.public())


async def reset(request: Request) -> Response:
    engine = _engine(request)
    raw = await request.body()
    try:
        changes = (await request.json()) if raw else {}
        config = SimConfig.model_validate({**engine.config.model_dump(), **changes})
    except (ValueError, ValidationError) as exc:
        return _json({"detail": str(exc)}, 422)
    await engine.reset(config)
    return _json(engine.config.public())


async def ground_truth(request: Request) -> Response:
    engine = _engine(request)
    if request_id := request.path_params.get("request_id"):
        req = engine.requests.get(request_id)
        if req is None:
            return _json({"detail": "unknown request"}, 404)
        return _json(engine.ground_truth(req))
    items = sorted(engine.requests.values(), key=lambda r: r.index)
    return _json([engine.ground_truth(req) for req in items])


async def webhooks(request: Request) -> Response:
    engine = _engine(request)
    wanted = request.query_params.get("request_id")
    items = [d.as_json() for d in engine.deliveries if not wanted or d.request_id == wanted]
    return _json(items)


async def rotate_keys(request: Request) -> Response:
    request.app.state.signer.rotate()
    return _json(request.app.state.signer.jwks())


async def add_file(request: Request) -> Response:
    engine = _engine(request)
    try:
        spec = await request.json()
        size = int(spec["size"])
        lifetime = spec.get("lifetime")
        if size < 0 or (lifetime is not None and float(lifetime) <= 0):
            raise ValueError("size must be >= 0 and lifetime > 0 (or null)")
    except (ValueError, KeyError, TypeError) as exc:
        detail = f"expected {{size, name?, content_type?, lifetime?}}: {exc}"
        return _json({"detail": detail}, 422)
    entry = engine.add_file(
        str(request.base_url).rstrip("/"),
        size,
        name=spec.get("name", "output.mp4"),
        content_type=spec.get("content_type", "video/mp4"),
        lifetime=None if lifetime is None else float(lifetime),
    )
    base = str(request.base_url).rstrip("/")
    return _json(
        {
            "url": f"{base}{entry.path}",
            "file_id": entry.file.file_id,  # what the bytes are a function of
            "file_size": size,
            "content_type": entry.file.content_type,
            "expires_at": entry.expires_wall,
        }
    )


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Start the queue engine's background work with the server; stop it on shutdown."""
    engine: Engine = app.state.engine
    await engine.start()
    try:
        yield
    finally:
        await engine.stop()


CONTROL_ROUTES = [
    Route("/health", health),
    Route("/config", get_config, methods=["GET"]),
    Route("/config", patch_config, methods=["PATCH", "PUT"]),
    Route("/reset", reset, methods=["POST"]),
    Route("/ground-truth", ground_truth),
    Route("/ground-truth/{request_id}", ground_truth),
    Route("/webhooks", webhooks),
    Route("/jwks/rotate", rotate_keys, methods=["POST"]),
    Route("/files", add_file, methods=["POST"]),
]
ROUTES = [
    Route("/.well-known/jwks.json", jwks),
    Mount("/_sim", routes=CONTROL_ROUTES),
    Route("/files/b/{file_id}/{name}", cdn, methods=["GET", "HEAD"]),
    Route("/_run/{path:path}", run_sync, methods=["POST"]),
    Route("/requests/delete_io/{request_id}", delete_io, methods=["PUT"]),
    Route("/{path:path}", queue, methods=["GET", "POST", "PUT"]),
]


def build_app(home: Path, config: SimConfig) -> Starlette:
    """The ASGI app; key material comes from (and stays in) `home/simulator/`.

    Its state (`app.state`): the queue `engine`, the webhook `signer`, the CDN's
    `url_signer`, the account's `api_keys` (config.fal_key / admin_key override them) and
    the status latency's `latency_rng`; the handlers read it from there.
    """
    sim_dir = home / "simulator"
    signer = WebhookSigner.load_or_create(sim_dir)
    url_signer = UrlSigner.load_or_create(sim_dir)
    app = Starlette(routes=ROUTES, lifespan=lifespan)
    app.state.engine = Engine(config, signer, url_signer)
    app.state.signer = signer
    app.state.url_signer = url_signer
    app.state.api_keys = ApiKeys.load_or_create(sim_dir)
    app.state.latency_rng = random.Random()  # a latency draw, not a secret
    return app


def _http_date(wall: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(wall))
