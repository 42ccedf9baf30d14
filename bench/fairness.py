"""Fairness under fal's concurrency cap: a small user inside a big batch, and single submits.

The simulator runs at most 10 requests at once (`concurrency_limit=10`, fixed run time,
no queue delay); the real webhook receiver records every ending in the ledger, which is
what the fan-out's bound on requests waiting at fal counts. One batch of 1,000 rows
from three users (800 / 150 / 50, the file sorted by user: the worst order) runs with 20
single submits (`submit_prompt`, normal priority) spread over it.

Figures (lower is better, so the ratio is baseline / value):
- the smallest user's p95 wait from admission (the item's `sent_at`) to start at fal,
  against the same user's 50 rows submitted alone (bar 1.5x, moonshot 1.2x);
- the single submits' p95 wait from arrival at fal to start, against the simulator's run
  time (bar 2x, moonshot 1.2x).

The bound is `RENDERQUEUE_FAL_MAX_QUEUED=20` (twice the cap) for both runs: a request's
wait at fal is the depth of the queue it joins over the cap, so the bound, not the order,
decides it. A third run, the mixed one again at the default bound (200), shows it: every
row waits ~20 run times (no bar; docs/batch.md "Fairness" says how to set the bound).
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.common import Figure, note, scaled, scratch_ledger
from renderqueue_pipeline.batch import BatchOptions, SubmitOptions, submit_batch_file
from renderqueue_pipeline.batch.single import submit_prompt
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.defs.resources import FalConnection
from renderqueue_pipeline.serving import bind_socket, serve_in_thread
from renderqueue_pipeline.settings import Settings, get_settings
from renderqueue_pipeline.simulator.server import client_env
from renderqueue_pipeline.simulator.testing import running_simulator, wait_until
from renderqueue_pipeline.webhook.app import ReceiverConfig, create_app
from renderqueue_pipeline.webhook.limits import server_options

CAP = 10
RUN_TIME = 0.5
MAX_QUEUED = int(os.environ.get("BENCH_FAIRNESS_MAX_QUEUED", 2 * CAP))
USERS = {1: scaled(800, 8), 2: scaled(150, 2), 3: scaled(50, 5)}
SMALL = 3
SINGLES = scaled(20, 2)
ENDPOINT = "bytedance/seedance-2.0/text-to-video"


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _write(path: Path, users: dict[int, int]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "prompt", "duration"])
        for user, count in users.items():
            for i in range(count):
                writer.writerow([user, f"user {user} row {i}: a heron over a still lake", "5"])
    return path


def _sent_at(ledger_url: str) -> dict[str, float]:
    """request_id -> the moment its item was admitted and sent (the ledger's sent_at)."""

    with connect(ledger_url, autocommit=True) as conn:
        rows = conn.execute(
            "select g.request_id, i.sent_at from batch_items i "
            "join generations g on g.request_id = i.request_id"
        ).fetchall()
    return {r["request_id"]: r["sent_at"].timestamp() for r in rows}


def _waits(sim: Any, ledger_url: str, user: int) -> list[float]:
    """Seconds from admission to start at fal of `user`'s batch rows."""
    sent = _sent_at(ledger_url)
    waits = []
    for truth in sim.control.ground_truth():
        if truth["request_id"] in sent and truth["tags"].get("rq_user") == str(user):
            waits.append(truth["started_at"] - sent[truth["request_id"]])
    return waits


def _batch(sim: Any, path: Path, ledger_url: str, singles: int) -> tuple[list[float], list[float]]:
    """Run one batch (and `singles` single submits during it) to the end of fal's work."""

    rows = sum(1 for _ in path.open()) - 1
    single_ids: list[str] = []

    def singles_during() -> None:
        spacing = rows / CAP * RUN_TIME / (singles + 1)
        for i in range(singles):
            time.sleep(spacing)
            single_ids.append(
                submit_prompt(9, ENDPOINT, f"single {i}", {"duration": "5"}, ledger_url=ledger_url)
            )

    fal = FalConnection(get_settings())  # the environment set above, as an entry point
    thread = threading.Thread(target=singles_during)
    thread.start()
    submit_batch_file(
        path.as_uri(),
        BatchOptions(default_endpoint=ENDPOINT, concurrency=16),
        submit_options=SubmitOptions.from_settings(fal.settings),
        gateway_factory=fal.gateway,
        platform_factory=fal.platform,
        ledger_url=ledger_url,
    )
    thread.join()
    wait_until(
        lambda: all(t["status"] == "completed" for t in sim.control.ground_truth()),
        timeout=rows * RUN_TIME + 120,
        interval=0.5,
    )
    singles_waits = [sim.control.ground_truth(r)["queue_wait"] for r in single_ids]
    return _waits(sim, ledger_url, SMALL), singles_waits


def run(console: Console) -> list[Figure]:
    if "fal_client" in sys.modules:
        raise RuntimeError("fal_client was imported before the simulator's host was set")

    home = Path(tempfile.mkdtemp(prefix="renderqueue-bench-fairness-"))
    sock = bind_socket("127.0.0.1", 0)
    os.environ.update(client_env(home, "127.0.0.1", sock.getsockname()[1]))
    default_bound = Settings.model_fields["fal_max_queued"].default
    knobs = {"concurrency_limit": CAP, "queue_delay": "0", "run_time": str(RUN_TIME)}
    results: dict[str, tuple[list[float], list[float]]] = {}
    with running_simulator(home, sock=sock, **knobs) as sim:
        for label, users, singles, bound in (
            ("alone", {SMALL: USERS[SMALL]}, 0, MAX_QUEUED),
            ("mixed", USERS, SINGLES, MAX_QUEUED),
            ("default bound", USERS, SINGLES, default_bound),
        ):
            sim.control.reset(**knobs)
            os.environ["RENDERQUEUE_FAL_MAX_QUEUED"] = str(bound)
            with scratch_ledger() as ledger_url:
                app = create_app(ReceiverConfig(ledger_url, sim.jwks_url))
                with serve_in_thread(app, **server_options()) as url:
                    os.environ["RENDERQUEUE_WEBHOOK_URL"] = f"{url}/webhooks/fal"
                    get_settings.cache_clear()
                    path = _write(home / f"{label.replace(' ', '-')}.csv", users)
                    with console.status(f"fairness: {label}, {sum(users.values()):,} rows"):
                        started = time.monotonic()
                        results[label] = _batch(sim, path, ledger_url, singles)
                    note(
                        console,
                        f"  {label} (bound {bound}): {sum(users.values()):,} rows in "
                        f"{time.monotonic() - started:.1f} s ({dt.datetime.now(dt.UTC):%H:%M:%S});"
                        f" user {SMALL}'s p95 wait {_p95(results[label][0]):.1f} s",
                    )
    alone, _ = results["alone"]
    small, singles_waits = results["mixed"]
    small_default, singles_default = results["default bound"]
    return [
        Figure(
            f"user {SMALL}'s p95 wait, admission to start ({len(small)} rows among "
            f"{sum(USERS.values()):,}; cap {CAP}, bound {MAX_QUEUED})",
            _p95(small),
            f"the same {len(alone)} rows alone",
            _p95(alone),
            unit="s",
            higher_is_better=False,
            required=1 / 1.5,
            moonshot=1 / 1.2,
        ),
        Figure(
            f"{len(singles_waits)} single submits' p95 start delay during the batch",
            _p95(singles_waits),
            "the simulator's run time",
            RUN_TIME,
            unit="s",
            higher_is_better=False,
            required=1 / 2,
            moonshot=1 / 1.2,
        ),
        Figure(
            f"user {SMALL}'s p95 wait, admission to start, at the default bound {default_bound}"
            " (why the bars above use a bound of twice the cap)",
            _p95(small_default),
            f"the same {len(alone)} rows alone",
            _p95(alone),
            unit="s",
            higher_is_better=False,
        ),
        Figure(
            f"{len(singles_default)} single submits' p95 start delay at the default bound",
            _p95(singles_default),
            "the simulator's run time",
            RUN_TIME,
            unit="s",
            higher_is_better=False,
        ),
    ]
