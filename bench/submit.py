"""Batch submission: bounded fan-out against the seed article's one-at-a-time loop.

The fal simulator runs as its own process with a 100 ms submit latency; every submit
goes through the real fal-client over TLS. The baseline is the seed article's loop:
submit one prompt, insert its row, then the next (200 prompts). The measured run is
`submit_batch_file` (what the `submit_batch` job and `renderqueue batch submit` run) on a
5,000-row CSV at concurrency 32: validation, budgets, intents, the fan-out and the ledger
writes all included. Its bound is concurrency / latency = 320 submits/s. Peak memory
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

from rich.console import Console

from bench.common import BENCH_HOME, Figure, scaled, scratch_ledger
from bench.memory import peak_rss_mb
from renderqueue_pipeline.serving import free_port
from renderqueue_pipeline.simulator.server import client_env

ENDPOINT = "bytedance/seedance-2.0/text-to-video"
LATENCY_S = 0.1
CONCURRENCY = 32
ROWS = scaled(5_000, 500)
BASELINE_ROWS = 200
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
    import fal_client
    import psycopg
    from psycopg.types.json import Jsonb

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


def _where_the_time_goes(profile: cProfile.Profile, top: int = 12) -> list[tuple[str, float]]:
    """Time spent in each package (tottime, waiting in epoll left out), largest first."""
    stats = pstats.Stats(profile)
    by_package: dict[str, float] = {}
    for (filename, _, function), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "epoll" in function or "select" in function:
            continue  # waiting for the network, not work
        package = _package_of(filename, function)
        by_package[package] = by_package.get(package, 0.0) + tottime
    total = sum(by_package.values()) or 1.0
    ranked = sorted(by_package.items(), key=lambda item: -item[1])[:top]
    return [(name, seconds / total) for name, seconds in ranked]


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
    from renderqueue_pipeline.batch import BatchOptions, submit_batch_file

    profiler = cProfile.Profile() if profile else None
    cpu_started = time.process_time()
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    result = submit_batch_file(
        Path(path).as_uri(),
        BatchOptions(default_endpoint=ENDPOINT, concurrency=concurrency, progress_seconds=5),
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
        import httpx

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
        prompts = _write_prompts(work / "prompts-5k.csv", ROWS, "fan-out")
        big = _write_prompts(work / "prompts-100k.csv", MEMORY_ROWS, "memory")
        profile_rows = _write_prompts(work / "prompts-profile.csv", PROFILE_ROWS, "profile")

        with scratch_ledger() as ledger_url:
            sim = _Simulator(work, LATENCY_S)
            try:
                env = {**sim.env, "DATABASE_URL": ledger_url, "RENDERQUEUE_HOME": str(work)}
                baseline = _run_child(
                    ["baseline", ledger_url, str(BASELINE_ROWS)],
                    env,
                    console,
                    f"seed article's loop: {BASELINE_ROWS} prompts one at a time",
                )
                fanout = _run_child(
                    ["batch", ledger_url, str(prompts), str(CONCURRENCY)],
                    env,
                    console,
                    f"submit_batch_file: {ROWS:,} rows at concurrency {CONCURRENCY}",
                )
                profiled = _run_child(
                    ["profile", ledger_url, str(profile_rows), str(CONCURRENCY)],
                    env,
                    console,
                    f"submit_batch_file under cProfile: {PROFILE_ROWS:,} rows (not timed)",
                )
            finally:
                sim.stop()
        per_row_ms = profiled["cpu_seconds"] / PROFILE_ROWS * 1000
        console.print(
            f"  where the submit run's CPU goes ({per_row_ms:.2f} ms a row under cProfile),"
            " by package:"
        )
        for package, share in profiled["profile"]:
            console.print(f"    {share:6.1%}  {package}")

        with scratch_ledger() as ledger_url:
            (work / "memory").mkdir()
            sim = _Simulator(work / "memory", 0.0)
            try:
                env = {**sim.env, "DATABASE_URL": ledger_url, "RENDERQUEUE_HOME": str(work)}
                memory = _run_child(
                    ["batch", ledger_url, str(big), str(MEMORY_CONCURRENCY)],
                    env,
                    console,
                    f"submit_batch_file: {MEMORY_ROWS:,} rows (peak memory)",
                )
            finally:
                sim.stop()

    assert fanout["submitted"] == ROWS, fanout
    assert memory["submitted"] == MEMORY_ROWS, memory
    baseline_rate = baseline["rows"] / baseline["seconds"]
    rate = fanout["submitted"] / fanout["seconds"]
    bound = CONCURRENCY / LATENCY_S
    console.print(
        f"  baseline {baseline_rate:,.1f}/s; fan-out {rate:,.1f}/s over {fanout['seconds']:.1f} s; "
        f"100k rows in {memory['seconds']:.0f} s, peak {memory['peak_mb']:.0f} MB; "
        f"client CPU {fanout['cpu_seconds'] / fanout['submitted'] * 1000:.2f} ms a submit"
    )
    return [
        Figure(
            f"submits/s, {ROWS:,} rows, concurrency {CONCURRENCY}, 100 ms latency",
            rate,
            f"seed article's loop ({BASELINE_ROWS} prompts)",
            baseline_rate,
            required=20,
        ),
        Figure(
            "submits/s against the concurrency bound",
            rate,
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
