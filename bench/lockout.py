"""Can the receiver be locked out without fal's key? `python -m bench.lockout`.

One `renderqueue webhook serve` process (its own process, production options) on a fresh
ledger; this process holds a crowd of connections to it for `--seconds` (45): `--bodies`
(300) well-formed signed-shape heads whose bodies trickle a byte a second, and `--heads`
(1,030) request heads sent a line a second; each connection the receiver cuts off is
reopened at once. Meanwhile a genuine signed delivery is sent every 2 s (retried every
2 s until accepted, then the next one) and `/healthz` is asked every 2 s. Reported: the
time from the crowd being in place to the first accepted delivery, every attempt's
answer and latency, /healthz's answers, and how many connections the receiver cut off.

All traffic is to 127.0.0.1. `--checkout DIR` runs the receiver from another checkout
(e.g. a copy of main, for the figure before a change). Not part of `make bench` (it
measures a refusal, not throughput against a baseline); the figures are in docs/webhook.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.common import scratch_ledger
from bench.webhook import serving
from renderqueue_pipeline.serving import free_port
from renderqueue_pipeline.webhook.testing import JwksServer, SlowSenders, fal_body, signed_headers


def trial(base: str, key: Ed25519PrivateKey, args: argparse.Namespace) -> dict:
    """The crowd for `args.seconds`, a delivery and a /healthz every 2 s; what they got."""
    host, port = base.removeprefix("http://").split(":")
    attempts, health = [], []
    accepted_at: float | None = None
    started = time.monotonic()
    with (
        SlowSenders(host, int(port), args.bodies, mode="body") as bodies,
        SlowSenders(host, int(port), args.heads, mode="head") as heads,
        httpx.Client(timeout=15) as client,
    ):
        in_place = time.monotonic()
        number = 0
        while time.monotonic() - in_place < args.seconds:
            tick = time.monotonic()
            request_id = f"lockout-{number}"
            body = fal_body(request_id)
            try:
                answer = client.post(
                    f"{base}/webhooks/fal",
                    content=body,
                    headers=signed_headers(key, body, request_id),
                )
                status = answer.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            seconds = time.monotonic() - tick
            attempts.append({"at": round(tick - in_place, 1), "status": status, "s": seconds})
            if isinstance(status, int) and 200 <= status < 300:
                number += 1
                if accepted_at is None:
                    accepted_at = tick + seconds - in_place
            tick_health = time.monotonic()
            try:
                health_status = client.get(f"{base}/healthz").status_code
            except httpx.HTTPError as exc:
                health_status = type(exc).__name__
            health.append({"status": health_status, "s": time.monotonic() - tick_health})
            time.sleep(max(0.0, 2.0 - (time.monotonic() - tick)))
        crowd = {
            "bodies_held_at_end": bodies.held,
            "heads_held_at_end": heads.held,
            "bodies_opened": bodies.opened,
            "heads_opened": heads.opened,
            "bodies_cut": bodies.cut,
            "heads_cut": heads.cut,
            "seconds_to_open_crowd": round(in_place - started, 1),
        }
    accepted = [a for a in attempts if isinstance(a["status"], int) and a["status"] < 300]
    return {
        "seconds_held": args.seconds,
        "first_accepted_after_s": None if accepted_at is None else round(accepted_at, 2),
        "attempts": len(attempts),
        "accepted": len(accepted),
        "answers": sorted({str(a["status"]) for a in attempts}),
        "max_delivery_latency_s": round(max(a["s"] for a in attempts), 3),
        "healthz_answers": sorted({str(h["status"]) for h in health}),
        "healthz_ok": sum(1 for h in health if h["status"] == 200),
        "healthz_asked": len(health),
        "max_healthz_latency_s": round(max(h["s"] for h in health), 3),
        "load_average": os.getloadavg(),
        **crowd,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--bodies", type=int, default=300)
    parser.add_argument("--heads", type=int, default=1030)
    parser.add_argument("--checkout", type=Path, default=None, help="run this checkout's receiver")
    args = parser.parse_args()
    key = Ed25519PrivateKey.generate()
    jwks = JwksServer(key)
    port = free_port()
    # -P: with --checkout, its PYTHONPATH wins over the working directory
    cmd = [sys.executable, "-P", "-m", "renderqueue_pipeline.cli", "webhook", "serve"]
    cmd += ["--port", str(port), "--insecure-jwks", "--log-level", "warning"]
    try:
        with scratch_ledger() as url, tempfile.TemporaryDirectory() as home:
            env = {"DATABASE_URL": url, "FAL_JWKS_URL": jwks.url, "RENDERQUEUE_HOME": home}
            if args.checkout is not None:
                env["PYTHONPATH"] = str(args.checkout.resolve())
            with serving(cmd, env, port, Path(home) / "receiver.log") as server:
                result = trial(server.base, key, args)
    finally:
        jwks.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
