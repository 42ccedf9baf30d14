"""Batch submission: bounded fan-out against the seed article's one-at-a-time loop.

The fal simulator runs as its own process with a 100 ms submit latency; every submit
goes through the real fal-client over TLS. The baseline is the seed article's loop:
submit one prompt, insert its row, then the next (200 prompts; the rate is flat, so
`BENCH_SCALE` scales it too). The measured run is
`submit_batch_file` (what the `submit_batch` job and `renderqueue batch submit` run) on a
5,000-row CSV at concurrency 32: validation, budgets, intents, the fan-out and the ledger
writes all included, 3 times (a new file and a fresh ledger each time, the simulator
reset): its ratio against the bound swung across the bar between runs (issue 23), so the
median run is compared. Its bound is
concurrency / latency = 320 submits/s. Peak memory
(the process's own peak RSS, VmHWM) is measured on a run over a 100,000-row file
(simulator latency 0, concurrency 64). A separate, untimed run of 1,000 rows under
cProfile prints where the client's CPU goes, by package. Each part runs in a fresh process.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psycopg
from psycopg.types.json import Jsonb
from rich.console import Console

from bench.common import BENCH_HOME, REPEATS, Figure, note, scaled, scratch_ledger
from bench.memory import peak_rss_mb
from renderqueue_pipeline.batch import BatchOptions, SubmitOptions, submit_batch_file
from renderqueue_pipeline.defs.resources import FalConnection
from renderqueue_pipeline.serving import free_port
from renderqueue_pipeline.settings import load_settings
from renderqueue_pipeline.simulator.server import client_env
from renderqueue_pipeline.simulator.testing import SimControl

ENDPOINT = "bytedance/seedance-2.0/text-to-video"
LATENCY_S = 0.1
CONCURRENCY = 32
ROWS = scaled(5_000, 500)
BASELINE_ROWS = scaled(200, 40)
MEMORY_ROWS = scaled(100_000, 5_000)
MEMORY_CONCURRENCY = 64
PROFILE_ROWS = scaled(1_000, 200)
MEMORY_LIMIT_MB = 300.0
HERE = Path(__file__).resolve().parent


def _write_prompts(path: Path, rows: int, tag: str) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "user_id", "duration", "resolution"])
        for i in range(rows):
            writer.writerow(
                [f"{tag} {i}: a red fox trotting through fresh snow", i % 50, "5", "720p"]
            )
    return path


# -- children (fresh processes: fal-client reads its host at import) ---------------------


def _child_baseline(ledger_url: str, rows: int) -> dict:
    """The seed article's submit path: submit, then insert, one prompt at a time."""
    import fal_client  # noqa: PLC0415 - reads its host on import: here, in the child

    client = fal_client.SyncClient()
    with psycopg.connect(ledger_url, autocommit=True) as conn:
        started = time.perf_counter()
        for i in range(rows):
            inputs = {"prompt": f"baseline {i}: a red fox", "resolution": "720p", "duration": "5"}
            handle = client.submit(ENDPOINT, arguments=inputs)
            conn.execute(
                "insert into generations (request_id, user_id, endpoint, inputs, cost_cents, "
                "status) values (%s, %s, %s, %s, %s, 'submitted') "
                "on conflict (request_id) do nothing",
                (handle.request_id, i % 50, ENDPOINT, Jsonb(inputs), 152),
            )
        elapsed = time.perf_counter() - started
    return {"rows": rows, "seconds": elapsed}


def _where_the_time_goes(profile: cProfile.Profile, top: int = 12) -> list[tuple[str, float, int]]:
    """Time spent in each package (tottime, waiting in epoll left out), largest first.

    With each its number of calls: a few calls for a whole run (e.g. loading a CA bundle
    per HTTP client) is set-up, thousands are per request.
    """
    stats = pstats.Stats(profile)
    by_package: dict[str, float] = {}
    calls: dict[str, int] = {}
    for (filename, _, function), (_, ncalls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "epoll" in function or "select" in function:
            continue  # waiting for the network, not work
        package = _package_of(filename, function)
        by_package[package] = by_package.get(package, 0.0) + tottime
        calls[package] = calls.get(package, 0) + ncalls
    total = sum(by_package.values()) or 1.0
    ranked = sorted(by_package.items(), key=lambda item: -item[1])[:top]
    return [(name, seconds / total, calls[name]) for name, seconds in ranked]


def _package_of(filename: str, function: str) -> str:
    if filename.startswith("~") or filename.startswith("<"):
        return f"C: {function}"
    parts = Path(filename).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    if "renderqueue_pipeline" in parts:
        return "renderqueue_pipeline"
    return "python stdlib: " + Path(filename).stem


def _child_batch(ledger_url: str, path: str, concurrency: int, profile: bool = False) -> dict:

    fal = FalConnection(load_settings())  # this child's environment, as an entry point
    profiler = cProfile.Profile() if profile else None
    cpu_started = time.process_time()
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    result = submit_batch_file(
        Path(path).as_uri(),
        BatchOptions(default_endpoint=ENDPOINT, concurrency=concurrency, progress_seconds=5),
        submit_options=SubmitOptions.from_settings(fal.settings),
        gateway_factory=fal.gateway,
        platform_factory=fal.platform,
        ledger_url=ledger_url,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - started
    return {
        "rows": result.report.counts["read"],
        "submitted": result.report.counts["submitted"],
        "rejected": result.report.counts["rejected"] + result.report.counts["over_budget"],
        "seconds": elapsed,
        "peak_mb": peak_rss_mb(),
        "rate_limited": result.stats.rate_limited,
        "cpu_seconds": time.process_time() - cpu_started,
        "profile": _where_the_time_goes(profiler) if profiler else [],
    }


def _run_child(args: list[str], env: dict[str, str], console: Console, label: str) -> dict:
    command = [sys.executable, "-m", "bench.submit", *args]
    with console.status(label):
        done = subprocess.run(
            command,
            env={**os.environ, **env},
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            timeout=1800,
        )
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{done.stderr[-3000:]}")
    progress = [line for line in done.stderr.splitlines() if "rows/s" in line]
    if progress:
        console.print(f"  {progress[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class _Simulator:
    """`renderqueue simulator serve` as its own process (its CPU is not ours)."""

    def __init__(self, home: Path, latency: float) -> None:
        self.home = home
        self.port = free_port()
        # no webhook receiver here: every request stays `submitted` in the ledger, so the
        # fan-out's bound on requests waiting at fal is off (it measures throughput)
        self.env = {**client_env(home, "127.0.0.1", self.port), "RENDERQUEUE_FAL_MAX_QUEUED": "0"}
        command = [
            sys.executable,
            "-m",
            "renderqueue_pipeline.cli",
            "simulator",
            "serve",
            "--port",
            str(self.port),
            "--submit-latency",
            str(latency),
            # no queue: the simulator then skips its queue-position scan over every
            # request so far (O(n) per submit); requests run for the whole bench
            "--queue-delay",
            "0",
            "--run-time",
            "600",
            "--log-level",
            "error",
        ]
        self.log = (home / "simulator.log").open("w")
        self.process = subprocess.Popen(
            command,
            env={**os.environ, "RENDERQUEUE_HOME": str(home)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:

        deadline = time.monotonic() + timeout
        bundle = self.env["SSL_CERT_FILE"]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the simulator exited: {(self.home / 'simulator.log').read_text()}"
                )
            try:
                httpx.get(f"https://127.0.0.1:{self.port}/_sim/health", verify=bundle, timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the simulator did not start")

    def reset(self, **knobs: str) -> None:
        """Forget every request so far and apply `knobs` (the control API's /_sim/reset)."""

        control = SimControl(f"https://127.0.0.1:{self.port}", Path(self.env["SSL_CERT_FILE"]))
        try:
            control.reset(**knobs)
        finally:
            control.close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def run(console: Console) -> list[Figure]:
    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BENCH_HOME, prefix="submit-") as tmp:
        work = Path(tmp)
        # a file per run: a batch sent once is not sent again (its rows are idempotent)
        prompts = [
            _write_prompts(work / f"prompts-5k-{i}.csv", ROWS, f"fan-out {i}")
            for i in range(REPEATS)
        ]
        big = _write_prompts(work / "prompts-100k.csv", MEMORY_ROWS, "memory")
        profile_rows = _write_prompts(work / "prompts-profile.csv", PROFILE_ROWS, "profile")

        # one simulator for every part, reset before each (its knobs, and no requests
        # left running from the last part); each timed run on a fresh ledger, so the three
        # runs are alike: none pays for the open rows of the one before
        sim = _Simulator(work, LATENCY_S)
        try:

            def child(ledger_url: str, args: list[str], label: str, **knobs: str) -> dict:
                sim.reset(**{"submit_latency": str(LATENCY_S), **knobs})
                env = {**sim.env, "DATABASE_URL": ledger_url, "RENDERQUEUE_HOME": str(work)}
                return _run_child([args[0], ledger_url, *args[1:]], env, console, label)

            with scratch_ledger() as ledger_url:
                baseline = child(
                    ledger_url,
                    ["baseline", str(BASELINE_ROWS)],
                    f"seed article's loop: {BASELINE_ROWS} prompts one at a time",
                )
                profiled = child(
                    ledger_url,
                    ["profile", str(profile_rows), str(CONCURRENCY)],
                    f"submit_batch_file under cProfile: {PROFILE_ROWS:,} rows (not timed)",
                )
            fanouts = []
            for i, path in enumerate(prompts):
                with scratch_ledger() as ledger_url:
                    fanouts.append(
                        child(
                            ledger_url,
                            ["batch", str(path), str(CONCURRENCY)],
                            f"submit_batch_file: {ROWS:,} rows at concurrency {CONCURRENCY}"
                            f" (run {i + 1} of {REPEATS})",
                        )
                    )
            with scratch_ledger() as ledger_url:
                memory = child(
                    ledger_url,
                    ["batch", str(big), str(MEMORY_CONCURRENCY)],
                    f"submit_batch_file: {MEMORY_ROWS:,} rows (peak memory)",
                    submit_latency="0",
                )
        finally:
            sim.stop()
        per_row_ms = profiled["cpu_seconds"] / PROFILE_ROWS * 1000
        note(
            console,
            f"  where the submit run's CPU goes ({per_row_ms:.2f} ms a row under cProfile,"
            f" {PROFILE_ROWS:,} rows), by package:",
        )
        for package, share, calls in profiled["profile"]:
            note(console, f"    {share:6.1%}  {calls:>9,} calls  {package}")

    for fanout in fanouts:
        assert fanout["submitted"] == ROWS, fanout
    assert memory["submitted"] == MEMORY_ROWS, memory
    baseline_rate = baseline["rows"] / baseline["seconds"]
    rates = [f["submitted"] / f["seconds"] for f in fanouts]
    bound = CONCURRENCY / LATENCY_S
    note(console, f"  seed article's loop: {baseline_rate:,.1f}/s")
    for fanout, rate in zip(fanouts, rates, strict=True):
        note(
            console,
            f"  fan-out: {rate:,.1f}/s over {fanout['seconds']:.1f} s; client CPU "
            f"{fanout['cpu_seconds'] / fanout['submitted'] * 1000:.2f} ms a submit",
        )
    note(
        console,
        f"  {MEMORY_ROWS:,} rows in {memory['seconds']:.0f} s, peak {memory['peak_mb']:.0f} MB",
    )
    return [
        Figure.of_runs(
            f"submits/s, {ROWS:,} rows, concurrency {CONCURRENCY}, 100 ms latency",
            rates,
            f"seed article's loop ({BASELINE_ROWS} prompts)",
            baseline_rate,
            required=20,
        ),
        Figure.of_runs(
            "submits/s against the concurrency bound",
            rates,
            f"bound: {CONCURRENCY} / {LATENCY_S} s",
            bound,
            required=0.7,
            moonshot=0.9,
        ),
        Figure(
            f"peak RSS of a {MEMORY_ROWS:,}-row run",
            memory["peak_mb"],
            "limit",
            MEMORY_LIMIT_MB,
            unit=" MB",
            required=1.0,
            higher_is_better=False,
        ),
    ]


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.submit")
    parser.add_argument("mode", choices=["baseline", "batch", "profile"])
    parser.add_argument("args", nargs="*")
    ns = parser.parse_args()
    if ns.mode == "baseline":
        out = _child_baseline(ns.args[0], int(ns.args[1]))
    else:
        out = _child_batch(ns.args[0], ns.args[1], int(ns.args[2]), ns.mode == "profile")
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
