"""The simulator's HTTP surface: fal's queue API, a sync run API, a CDN, JWKS and a control API.

Wire shapes follow shared/fal-wire.md; anything fal-client reads is present with
the type it expects, so unmodified fal-client cannot tell this from fal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from renderqueue_pipeline.simulator.config import SimConfig
from renderqueue_pipeline.simulator.engine import TERMINAL, Engine, SimRequest
from renderqueue_pipeline.simulator.keys import UrlSigner, WebhookSigner
from renderqueue_pipeline.simulator.models import OutputFile, file_chunks, validate_inputs

NAMESPACES = ("workflows", "comfy")
NGINX_503 = (
    "<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
    "<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n"
    "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
CONTENT_TYPES = {".mp4": "video/mp4", ".jpeg": "image/jpeg", ".jpg": "image/jpeg"}


def _json(body: Any, status: int = 200, request_id: str | None = None) -> JSONResponse:
    headers = {"x-fal-request-id": request_id} if request_id else None
    return JSONResponse(body, status_code=status, headers=headers)


def _split_app(path: str) -> tuple[str, list[str]] | None:
    """Split `[namespace/]owner/app/rest...` into ("[ns/]owner/app", rest)."""
    parts = [p for p in path.strip("/").split("/") if p]
    prefix = ""
    if parts and parts[0] in NAMESPACES:
        prefix, parts = parts[0] + "/", parts[1:]
    if len(parts) < 2:
        return None
    return f"{prefix}{parts[0]}/{parts[1]}", parts[2:]


def build_app(home: Path, config: SimConfig) -> Starlette:
    """The ASGI app; key material comes from (and stays in) `home/simulator/`."""
    sim_dir = home / "simulator"
    signer = WebhookSigner.load_or_create(sim_dir)
    url_signer = UrlSigner.load_or_create(sim_dir)
    engine = Engine(config, signer, url_signer)

    def authorized(request: Request) -> JSONResponse | None:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme != "Key" or not key.strip():
            return _json({"detail": "No credentials: send 'Authorization: Key <FAL_KEY>'"}, 401)
        if engine.config.fal_key and key.strip() != engine.config.fal_key:
            return _json({"detail": "Invalid credentials"}, 401)
        return None

    def fault_response(fault: str, request_id: str | None = None) -> Response:
        if fault == "429":
            return _json({"detail": "Too many requests; slow down"}, 429)
        if fault == "503":
            return Response(NGINX_503, status_code=503, media_type="text/html")
        return Response(
            '{"detail":"Internal server error","error_type":"internal_error"}',
            status_code=500,
            media_type="application/json",
            headers={"x-fal-request-id": request_id or "", "x-fal-error-type": "internal_error"},
        )

    async def read_inputs(request: Request) -> Any:
        raw = await request.body()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def queue_urls(base: str, app_path: str, request_id: str) -> dict[str, str]:
        response_url = f"{base}/{app_path}/requests/{request_id}"
        return {
            "response_url": response_url,
            "status_url": f"{response_url}/status",
            "cancel_url": f"{response_url}/cancel",
        }

    async def submit(request: Request, endpoint: str, app_path: str) -> Response:
        fault = engine.api_fault()
        if fault in ("429", "503"):
            return fault_response(fault)
        inputs = await read_inputs(request)
        if engine.config.validation == "submit" or inputs is None:
            errors = validate_inputs(endpoint, inputs)
            if errors:
                return _json({"detail": errors}, 422)
        webhook_url = request.query_params.get("fal_webhook") or None
        base = str(request.base_url).rstrip("/")
        req = engine.create(endpoint, app_path, inputs, webhook_url, base)
        if req.decisions.early and webhook_url:
            engine.refresh(req)
            await engine.deliver_now(req)
        if req.decisions.submit_latency > 0:
            await asyncio.sleep(req.decisions.submit_latency)
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

    def find(app_path: str, request_id: str) -> SimRequest | None:
        req = engine.requests.get(request_id)
        if req is None or req.app_path != app_path or req.sync:
            return None
        return req

    latency_rng = random.Random()

    async def status(request: Request, req: SimRequest) -> Response:
        latency = engine.config.dist("status_latency").sample(latency_rng)
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
            "metrics": {"inference_time": round(req.decisions.run_time, 3)},
            **common,
        }
        if state == "failed":
            body["error"] = "Invalid status code: 422"
        elif state == "canceled":
            body["error"] = "Request cancelled"
            body["error_type"] = "request_cancelled"
        return _json(body, 200, req.request_id)

    async def result(req: SimRequest) -> Response:
        state = engine.refresh(req)
        if state not in TERMINAL:
            return _json({"detail": "Request is still in progress"}, 400, req.request_id)
        if req.finished_wall and time.time() - req.finished_wall > engine.config.result_ttl:
            return _json({"detail": "Request result has expired"}, 404, req.request_id)
        if state == "failed":
            return _json(req.error_body(), 422, req.request_id)
        if state == "canceled":
            body = {"detail": "Request was cancelled", "error_type": "request_cancelled"}
            return JSONResponse(
                body,
                status_code=400,
                headers={
                    "x-fal-request-id": req.request_id,
                    "x-fal-error-type": body["error_type"],
                },
            )
        return _json(engine.output(req), 200, req.request_id)

    async def queue(request: Request) -> Response:
        split = _split_app(request.path_params["path"])
        if split is None:
            return _json({"detail": "Not found: expected /{owner}/{app}[/path]"}, 404)
        app_path, rest = split
        if denied := authorized(request):
            return denied
        if request.method == "POST":
            return await submit(request, request.path_params["path"].strip("/"), app_path)
        if len(rest) < 2 or rest[0] != "requests" or len(rest) > 3:
            detail = (
                "Not found: status, result and cancel URLs use only /{owner}/{app}/requests/{id}"
            )
            return _json({"detail": detail}, 404)
        request_id, action = rest[1], (rest[2] if len(rest) == 3 else "")
        fault = engine.api_fault()
        if fault:
            return fault_response(fault, request_id)
        req = find(app_path, request_id)
        if request.method == "PUT" and action == "cancel":
            if req is None:
                return _json({"status": "NOT_FOUND"}, 404)
            outcome = engine.cancel(req)
            code = 202 if outcome == "CANCELLATION_REQUESTED" else 400
            return _json({"status": outcome}, code, req.request_id)
        if request.method != "GET" or action not in ("", "status"):
            return _json({"detail": "Method not allowed"}, 405)
        if req is None:
            return _json({"detail": f"Request {request_id} not found"}, 404)
        return await status(request, req) if action == "status" else await result(req)

    async def run_sync(request: Request) -> Response:
        """fal.run's synchronous API (FAL_RUN_HOST=<host>/_run): wait, then return the output."""
        endpoint = request.path_params["path"].strip("/")
        split = _split_app(endpoint)
        if split is None:
            return _json({"detail": "Not found: expected /{owner}/{app}[/path]"}, 404)
        if denied := authorized(request):
            return denied
        fault = engine.api_fault()
        if fault:
            return fault_response(fault)
        inputs = await read_inputs(request)
        errors = validate_inputs(endpoint, inputs)
        if errors:
            return _json({"detail": errors}, 422)
        base = str(request.base_url).rstrip("/")
        req = engine.create(endpoint, split[0], inputs, None, base, sync=True)
        await req.done.wait()
        if req.state == "failed":
            return _json(req.error_body(), 422, req.request_id)
        return _json(engine.output(req), 200, req.request_id)

    async def cdn(request: Request) -> Response:
        file_id, name = request.path_params["file_id"], request.path_params["name"]
        try:
            size = int(request.query_params["size"])
            expires = int(request.query_params["exp"])
            sig = request.query_params["sig"]
        except (KeyError, ValueError):
            return Response("Forbidden: unsigned URL", status_code=403)
        path = f"/files/b/{file_id}/{name}"
        if not url_signer.verify(f"{path}\n{size}", expires, sig):
            return Response("Forbidden: bad signature", status_code=403)
        if time.time() > expires:
            return Response("Forbidden: URL expired", status_code=403)
        suffix = Path(name).suffix.lower()
        content_type = CONTENT_TYPES.get(suffix, "application/octet-stream")
        headers = {
            "content-length": str(size),
            "etag": f'"{file_id}-{size}"',
            "cache-control": "private, max-age=0",
            "accept-ranges": "none",
        }
        if request.method == "HEAD":
            return Response(status_code=200, headers=headers, media_type=content_type)
        file = OutputFile(file_id, name, content_type, size)
        return StreamingResponse(file_chunks(file), headers=headers, media_type=content_type)

    async def jwks(_: Request) -> Response:
        return JSONResponse(signer.jwks(), headers={"cache-control": "public, max-age=86400"})

    # ----- control API (tests and operators; no fal equivalent) --------------------------------

    async def health(_: Request) -> Response:
        return _json(
            {
                "ok": True,
                "seed": engine.config.seed,
                "requests": len(engine.requests),
                "api_calls": engine.api_calls,
                "api_faults": engine.api_faults,
                "pending_tasks": len(engine.tasks),
            }
        )

    async def get_config(_: Request) -> Response:
        return _json(engine.config.public())

    async def patch_config(request: Request) -> Response:
        try:
            changes = await request.json()
            engine.update_config(
                SimConfig.model_validate({**engine.config.model_dump(), **changes})
            )
        except (ValueError, ValidationError) as exc:
            return _json({"detail": str(exc)}, 422)
        return _json(engine.config.public())

    async def reset(request: Request) -> Response:
        raw = await request.body()
        try:
            changes = (await request.json()) if raw else {}
            config = SimConfig.model_validate({**engine.config.model_dump(), **changes})
        except (ValueError, ValidationError) as exc:
            return _json({"detail": str(exc)}, 422)
        await engine.reset(config)
        return _json(engine.config.public())

    async def ground_truth(request: Request) -> Response:
        if request_id := request.path_params.get("request_id"):
            req = engine.requests.get(request_id)
            if req is None:
                return _json({"detail": "unknown request"}, 404)
            return _json(engine.ground_truth(req))
        items = sorted(engine.requests.values(), key=lambda r: r.index)
        return _json([engine.ground_truth(req) for req in items])

    async def webhooks(request: Request) -> Response:
        wanted = request.query_params.get("request_id")
        items = [d.as_json() for d in engine.deliveries if not wanted or d.request_id == wanted]
        return _json(items)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    control = [
        Route("/health", health),
        Route("/config", get_config, methods=["GET"]),
        Route("/config", patch_config, methods=["PATCH", "PUT"]),
        Route("/reset", reset, methods=["POST"]),
        Route("/ground-truth", ground_truth),
        Route("/ground-truth/{request_id}", ground_truth),
        Route("/webhooks", webhooks),
    ]
    app = Starlette(
        routes=[
            Route("/.well-known/jwks.json", jwks),
            Mount("/_sim", routes=control),
            Route("/files/b/{file_id}/{name}", cdn, methods=["GET", "HEAD"]),
            Route("/_run/{path:path}", run_sync, methods=["POST"]),
            Route("/{path:path}", queue, methods=["GET", "POST", "PUT"]),
        ],
        lifespan=lifespan,
    )
    app.state.engine = engine
    return app
