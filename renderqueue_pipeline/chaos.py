"""`make chaos`: one run of the whole product with every fault at once, then a full audit.

Real processes on 127.0.0.1 only: an embedded Postgres under its own RENDERQUEUE_HOME, the
fal simulator (`renderqueue simulator serve`, every fault knob on), a webhook receiver
under a restart loop, moto's S3 server, and the `renderqueue` CLI (batch, reconcile,
archive) as child processes. Faults are seeded (the simulator decides per request from
`seed`); the kills and outages happen at fixed points of the run (a count of requests at
fal), never at a wall-clock moment. The run ends with the ledger compared to the
simulator's ground truth request by request; any difference is a mismatch (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import hashlib
import logging
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import psycopg
from psycopg.rows import dict_row
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from renderqueue_pipeline.db import LedgerConnection, one_row
from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.db.server import embedded_url, stop_embedded
from renderqueue_pipeline.dev import _bin as find
from renderqueue_pipeline.dev import read_exports, read_receiver_url
from renderqueue_pipeline.fal_platform import FalPlatform
from renderqueue_pipeline.reports.checks import report_matches_ledger
from renderqueue_pipeline.reports.spend import refresh_month
from renderqueue_pipeline.simulator.testing import SimControl

ENDPOINT = "bytedance/seedance-2.0/fast/text-to-video"
BUCKET = "renderqueue-chaos"

#: every fault knob of the simulator, on at once (docs/simulator.md, "Timing and fault model")
FAULTS: dict[str, Any] = {
    "failure_rate": 0.08,
    "payload_error_rate": 0.08,
    "requeue_rate": 0.15,
    "webhook_duplicate_rate": 0.15,
    "webhook_drop_rate": 0.08,
    "webhook_out_of_order_rate": 0.15,
    "webhook_out_of_order_delay": "0.2:1.0",
    "webhook_early_rate": 0.08,
    "api_429_rate": 0.03,
    "api_502_rate": 0.02,
    "api_503_rate": 0.02,
    "api_504_rate": 0.02,
    "api_500_rate": 0.01,
    "submit_lost_answer_rate": 0.02,
}
#: timings that keep the run inside minutes (fal's runs take minutes, fal's retries hours)
TIMINGS: dict[str, Any] = {
    "queue_delay": "0.2:1.5",
    "run_time": "0.3:1.5",
    "webhook_retry_base": 0.5,
    "webhook_retry_max": 4,
    "webhook_max_attempts": 11,
    "webhook_timeout": 5,
    "size_scale": 0.02,
}


@dataclass
class ChaosConfig:
    """The size of one run and the seed of every simulator decision."""

    rows: int = 240
    seed: int = 19
    #: the first batch process is killed -9 once fal holds this many of its requests
    kill_batch_at: int = 40
    concurrency: int = 8
    #: stop and start the embedded Postgres (needs the run's own embedded server)
    restart_postgres: bool = True
    #: kill -9 a Dagster run worker mid-pass (timing-dependent: `make chaos` only)
    kill_dagster_worker: bool = True
    #: seconds the whole run may take before it gives up (a mismatch, not a hang)
    timeout: float = 540.0
    faults: dict[str, Any] = field(default_factory=lambda: dict(FAULTS))


@dataclass
class FaultRow:
    """One line of the final table."""

    fault: str
    fired: int
    absorbed_by: str


@dataclass
class ChaosResult:
    """What happened and what did not match."""

    faults: list[FaultRow]
    mismatches: list[str]
    requests: int
    seconds: float
    figures: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _bin(name: str) -> str:

    return find(name)


def _wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll until `predicate()` is truthy; a generous deadline that only matters on failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ChaosError(f"{what}: not reached within {timeout:.0f} s")
        time.sleep(interval)


class ChaosError(Exception):
    """The run could not go on (a process did not start, a wait ran out)."""


class ReceiverLoop:
    """A supervisor for the webhook receiver: restarts it on the same port when it dies."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.port = 0
        self.url = ""
        self.restarts = 0
        self.process: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _start(self) -> None:

        log = self.log_dir / f"webhook-{self.restarts}.log"
        log.write_text("")
        argv = [_bin("renderqueue"), "webhook", "serve", "--port", str(self.port)]
        self.process = subprocess.Popen(  # noqa: S603 - our own programs, argv built here
            argv,
            env=self.env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = read_receiver_url(self.process, log)
        self.port = urlparse(self.url).port or 0

    def start(self) -> ReceiverLoop:
        self._start()  # port 0 the first time; every restart binds the port it got
        _wait(lambda: _healthy(f"{self.url}/healthz"), 60, "receiver /healthz")
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.process is not None and self.process.poll() is not None:
                self.restarts += 1
                with contextlib.suppress(Exception):
                    self._start()
            self._stop.wait(0.2)

    def kill(self) -> None:
        """SIGKILL the receiver (the loop brings it back)."""
        if self.process is None:
            raise RuntimeError("the receiver was never started")
        os.killpg(self.process.pid, signal.SIGKILL)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _healthy(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code == 200
    return False


class Moto:
    """moto's S3 server on 127.0.0.1, stoppable and restartable on the same port (its
    state lives in this process, so the bucket and objects survive the outage)."""

    def __init__(self) -> None:
        self.port = 0
        self.server: Any = None

    def start(self) -> None:

        # the test extra: only a chaos run needs it
        from moto.server import ThreadedMotoServer  # noqa: PLC0415

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 call
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = self.server._server.server_port

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        import boto3  # noqa: PLC0415 - the test extra: only a chaos run needs it

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="chaos",
            aws_secret_access_key="chaos",  # noqa: S106 - moto's throwaway local key
        )


def _empty_bucket(s3: Any) -> None:
    """The run's bucket, created or emptied (moto keeps state per process)."""
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
            s3.delete_object(Bucket=BUCKET, Key=item["Key"])


def write_prompts(path: Path, rows: int, seed: int) -> Path:
    """A batch file of `rows` prompts: three users, durations 4..8 s, 480p."""
    rng = random.Random(seed)  # noqa: S311 - seeded test data, not a secret
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "user_id", "duration", "resolution"])
        for n in range(rows):
            writer.writerow([f"chaos shot {n}", 900 + n % 3, str(rng.randint(4, 8)), "480p"])
    return path


@contextlib.contextmanager
def _simulator(env: dict[str, str], log_dir: Path, seed: int, knobs: dict) -> Iterator[dict]:

    argv = [_bin("renderqueue"), "simulator", "serve", "--port", "0", "--platform-port", "0"]
    argv += ["--seed", str(seed)]
    for name, value in knobs.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    log = log_dir / "simulator.log"
    log.write_text("")
    process = subprocess.Popen(  # noqa: S603 - our own programs, argv built here
        argv, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield read_exports(process, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Run:
    """One chaos run's processes, counters and log (see `run_chaos`)."""

    def __init__(self, home: Path, config: ChaosConfig, say: Callable[[str], None]) -> None:
        self.home = home
        self.config = config
        self.say = say
        self.log_dir = home / "logs"
        self.counts: Counter[str] = Counter()
        self.started = time.monotonic()

    def remaining(self) -> float:
        return max(5.0, self.config.timeout - (time.monotonic() - self.started))

    def cli(self, env: dict[str, str], *args: str, timeout: float | None = None) -> str:
        """Run `renderqueue ARGS` to its end; its output goes to the run's log."""
        name = args[0]
        with (self.log_dir / f"cli-{name}.log").open("ab") as log:
            done = subprocess.run(  # noqa: S603 - our own programs, argv built here
                [_bin("renderqueue"), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                timeout=timeout or self.remaining(),
            )
            log.write(done.stdout)
        if done.returncode != 0:
            raise ChaosError(f"renderqueue {' '.join(args)} exited {done.returncode}")
        return done.stdout.decode(errors="replace")


def run_chaos(
    home: Path,
    config: ChaosConfig | None = None,
    *,
    database_url: str | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> ChaosResult:
    """Run every fault at once against a fresh ledger; compare; return the table.

    `home`: the run's RENDERQUEUE_HOME (emptied first). Without `database_url` the run
    starts its own embedded Postgres there (and can stop and start it); with one, it
    migrates that database and leaves the server alone.
    """

    config = config or ChaosConfig()
    own_server = database_url is None
    if own_server:
        stop_embedded(home)
        shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    run = Run(home, config, say)
    run.log_dir.mkdir(parents=True, exist_ok=True)
    url = database_url or embedded_url(home)
    migrate(url)
    say(f"ledger migrated ({'embedded server under ' + str(home) if own_server else 'given'})")

    base = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "RENDERQUEUE_"))}
    base |= {"RENDERQUEUE_HOME": str(home), "DATABASE_URL": url, "PYTHONUNBUFFERED": "1"}
    moto = Moto()
    moto.start()
    receiver: ReceiverLoop | None = None
    try:
        with _simulator(base, run.log_dir, config.seed, {**TIMINGS, **config.faults}) as sim:
            env = {**base, **sim}
            host = env["FAL_QUEUE_RUN_HOST"]
            env |= {
                "AWS_ACCESS_KEY_ID": "chaos",
                "AWS_SECRET_ACCESS_KEY": "chaos",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": moto.endpoint,
                # botocore's own retries (5 by default, with backoff) against a refused port
                # only slow the outage down; the archive's backoff is what absorbs it
                "AWS_MAX_ATTEMPTS": "1",
                "RENDERQUEUE_STORAGE_URL": f"s3://{BUCKET}/outputs",
                "RENDERQUEUE_ARCHIVE_HOSTS": host,
                "RENDERQUEUE_ARCHIVE_LOOPBACK_HOSTS": host,
                "RENDERQUEUE_RECONCILE_ADOPT": "on",
            }
            _empty_bucket(moto.client())
            control = SimControl(f"https://{host}", Path(env["SSL_CERT_FILE"]))
            say(f"fal simulator https://{host} (seed {config.seed}); S3 {moto.endpoint}")
            receiver = ReceiverLoop(env, run.log_dir).start()
            env["RENDERQUEUE_WEBHOOK_URL"] = f"{receiver.url}/webhooks/fal"
            say(f"webhook receiver {receiver.url} under a restart loop")
            _drive(run, env, control, receiver, moto, url, own_server)
            result = _audit(run, env, control, receiver, moto, url)
            control.close()
            return result
    finally:
        if receiver is not None:
            receiver.stop()
        moto.stop()
        if own_server:
            stop_embedded(home)


def _batch(env: dict[str, str], path: Path, concurrency: int, log: Path) -> subprocess.Popen:
    argv = [_bin("renderqueue"), "batch", "submit", str(path), "--endpoint", ENDPOINT]
    argv += ["--concurrency", str(concurrency)]
    return subprocess.Popen(  # noqa: S603 - our own programs, argv built here
        argv, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _drive(
    run: Run,
    env: dict[str, str],
    control: Any,
    receiver: ReceiverLoop,
    moto: Moto,
    url: str,
    own_server: bool,
) -> None:
    """The faults of our own side, at fixed points of the run."""

    config = run.config
    path = write_prompts(run.home / "prompts.csv", config.rows, config.seed)
    say = run.say

    # 1. the batch process killed -9 while fal holds requests it has not answered yet
    control.set_faults(submit_latency=30)
    first = _batch(env, path, config.kill_batch_at, run.log_dir / "batch-1.log")
    try:
        _wait(
            lambda: len(control.ground_truth()) >= config.kill_batch_at,
            run.remaining(),
            "requests of the first batch process at fal",
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    control.set_faults(submit_latency=0)
    run.counts["batch_killed"] += 1
    say(f"batch process killed -9 with {len(control.ground_truth())} requests at fal")

    # 2. the rerun; the receiver killed -9 halfway through it
    second = _batch(env, path, config.concurrency, run.log_dir / "batch-2.log")
    halfway = config.kill_batch_at + (config.rows - config.kill_batch_at) // 2
    _wait(
        lambda: len(control.ground_truth()) >= halfway or second.poll() is not None,
        run.remaining(),
        "half of the rerun at fal",
    )
    receiver.kill()
    run.counts["receiver_killed"] += 1
    say("webhook receiver killed -9 halfway through the rerun")
    try:
        second.wait(run.remaining())
    except subprocess.TimeoutExpired as exc:
        os.killpg(second.pid, signal.SIGKILL)
        raise ChaosError("the batch rerun did not finish") from exc
    if second.returncode != 0:
        raise ChaosError(f"the batch rerun exited {second.returncode} (see batch-2.log)")
    _wait(lambda: receiver.restarts >= 1 and _healthy(f"{receiver.url}/healthz"), 60, "restart")

    # 3. Postgres stopped while webhooks are still coming, then started again
    if own_server and config.restart_postgres:
        stop_embedded(run.home)
        run.counts["postgres_stopped"] += 1
        say("Postgres stopped")
        # fal's deliveries meet a receiver without a database: wait until one was refused
        before = _failed_deliveries(control)
        with contextlib.suppress(ChaosError):
            _wait(lambda: _failed_deliveries(control) > before, 20, "a delivery refused")
        embedded_url(run.home)
        say("Postgres started again")

    # 4. a Dagster run worker (the reconcile job) killed -9 while its fal calls are in flight
    if config.kill_dagster_worker:
        _kill_dagster_run_worker(run, env, control)

    # 5. the reconciler until nothing is open at fal or in the ledger
    def settled() -> bool:
        run.cli(env, "reconcile", "--min-age-minutes", "0")
        run.counts["reconcile_passes"] += 1
        truth = control.ground_truth()
        if any(t["status"] not in ("completed", "failed", "canceled") for t in truth):
            return False
        with LedgerConnection.connect(url, row_factory=dict_row) as conn:
            open_rows = one_row(
                conn.execute(
                    "select count(*) as n from generations "
                    "where status in ('submitted', 'in_progress') or status is null"
                )
            )["n"]
            open_items = one_row(
                conn.execute(
                    "select count(*) as n from batch_items where state in ('pending', 'unknown')"
                )
            )["n"]
        return open_rows == 0 and open_items == 0

    _wait(settled, run.remaining(), "ledger settled", interval=2.0)
    say(f"ledger settled after {run.counts['reconcile_passes']} reconcile passes")

    # 6. the archive with S3 down, then up
    moto.stop()
    run.counts["s3_down_runs"] += 1
    down = run.cli(env, "archive")
    run.counts["s3_down_retrying"] = _archive_figure(down, "retrying")
    say(f"archive with S3 down: {down.strip().splitlines()[0] if down.strip() else down}")
    moto.start()
    with psycopg.connect(url, autocommit=True) as conn:
        # the operator's "retry now" once the store is back (docs/archive.md backs off 60 s)
        conn.execute(
            "update generations set archive_next_attempt_at = null "
            "where archive_status = 'pending' and archive_next_attempt_at is not null"
        )

    def archived() -> bool:
        run.cli(env, "archive")
        run.counts["archive_runs"] += 1
        with LedgerConnection.connect(url, row_factory=dict_row) as conn:
            return (
                one_row(
                    conn.execute(
                        "select count(*) as n from generations "
                        "where status = 'completed' and archive_status = 'pending'"
                    )
                )["n"]
                == 0
            )

    _wait(archived, run.remaining(), "every output archived", interval=1.0)
    say("archive complete")


RECONCILE_RUN_CONFIG = "ops:\n  reconcile_open_rows:\n    config:\n      min_age_minutes: 0\n"


def _kill_dagster_run_worker(run: Run, env: dict[str, str], control: Any) -> None:
    """`dagster job execute` of `reconcile_ledger` (the process that executes the run, as
    the daemon's run launcher would start it), SIGKILLed once fal has answered some of its
    status calls; fal's status calls are slowed so the pass is still running then."""
    home = subprocess.run(
        [
            sys.executable,
            "-c",
            "from renderqueue_pipeline.dagster_home import ensure_dagster_home as e; print(e())",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=run.remaining(),
    ).stdout.strip()
    config = run.home / "reconcile-run.yaml"
    config.write_text(RECONCILE_RUN_CONFIG)
    log = run.log_dir / "dagster-run-worker.log"
    control.set_faults(status_latency=0.5)
    calls = control.health()["api_calls"]
    argv = [_bin("dagster"), "job", "execute", "-m", "renderqueue_pipeline.definitions"]
    argv += ["-j", "reconcile_ledger", "-c", str(config)]
    worker = subprocess.Popen(  # noqa: S603 - our own programs, argv built here
        argv,
        env={**env, "DAGSTER_HOME": home},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait(
            lambda: control.health()["api_calls"] >= calls + 4 or worker.poll() is not None,
            run.remaining(),
            "the Dagster run worker's first fal calls",
        )
        if worker.poll() is None:
            run.counts["dagster_worker_killed"] += 1
            run.say("Dagster run worker (reconcile_ledger) killed -9 mid-pass")
        else:
            run.say(f"Dagster run worker ended ({worker.returncode}) before it could be killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        control.set_faults(status_latency=0)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables of this process for the block only (a test shares it)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _failed_deliveries(control: Any) -> int:
    return sum(1 for a in control.webhook_attempts() if a["outcome"] == "failed")


def _archive_figure(output: str, word: str) -> int:
    for line in output.splitlines():
        for part in line.replace(";", ",").split(","):
            bits = part.strip().split()
            if len(bits) >= 2 and bits[0] == word and bits[1].isdigit():
                return int(bits[1])
    return 0


# one checklist of invariants, each a few lines, read top to bottom
def _audit(  # noqa: C901
    run: Run, env: dict[str, str], control: Any, receiver: ReceiverLoop, moto: Moto, url: str
) -> ChaosResult:
    """The ledger against the simulator's ground truth, request by request."""

    mismatches: list[str] = []
    truth = {t["request_id"]: t for t in control.ground_truth()}
    health = control.health()
    attempts = control.webhook_attempts()
    bundle = env["SSL_CERT_FILE"]

    nanos: Counter[str] = Counter()
    start = dt.datetime.fromtimestamp(min(float(t["submitted_at"]) for t in truth.values()), dt.UTC)
    with (
        _environ(SSL_CERT_FILE=bundle),  # the client trusts the simulator's bundle
        FalPlatform(
            env.get("FAL_ADMIN_KEY") or env["FAL_KEY"], base_url=env["RENDERQUEUE_FAL_API_URL"]
        ) as platform,
    ):
        window = (start - dt.timedelta(hours=1), dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        for page in platform.billing_event_pages(*window, endpoint_ids=[ENDPOINT]):
            for event in page:
                nanos[event["request_id"]] += int(event["cost_estimate_nano_usd"])

    s3 = moto.client()
    stored = {
        o["Key"]: o for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    }  # a small run: one page
    with LedgerConnection.connect(url, row_factory=dict_row) as conn:
        rows = {
            r["request_id"]: r
            for r in conn.execute(
                "select request_id, status::text as status, cost_micros, archive_status,"
                " archive_sha256, archive_url, archive_bytes, duplicate_of, batch_item_id "
                "from generations"
            )
        }
        if set(rows) != set(truth):
            missing = sorted(set(truth) - set(rows))[:5]
            extra = sorted(set(rows) - set(truth))[:5]
            mismatches.append(f"requests at fal not in the ledger {missing}, extra {extra}")
        with httpx.Client(verify=ssl.create_default_context(cafile=bundle), timeout=60) as cdn:
            for request_id, t in truth.items():
                row = rows.get(request_id)
                if row is None:
                    continue
                if row["status"] != t["status"]:
                    mismatches.append(f"{request_id}: ledger {row['status']}, fal {t['status']}")
                billed = (nanos[request_id] + 500) // 1000
                if int(row["cost_micros"] or 0) != billed:
                    mismatches.append(
                        f"{request_id}: cost {row['cost_micros']} µ$, fal billed {billed} µ$"
                    )
                if t["status"] == "completed" and t.get("file_url"):
                    want = hashlib.sha256(cdn.get(t["file_url"]).content).hexdigest()
                    key = urlparse(row["archive_url"] or "").path.lstrip("/")
                    got = (
                        hashlib.sha256(
                            s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                        ).hexdigest()
                        if key in stored
                        else None
                    )
                    if row["archive_status"] != "archived" or got != want:
                        mismatches.append(
                            f"{request_id}: archived {row['archive_status']}, stored sha256 "
                            f"{got}, fal's {want}"
                        )
        archived = sum(1 for r in rows.values() if r["archive_status"] == "archived")
        if len(stored) != archived:
            mismatches.append(f"{len(stored)} objects in S3 for {archived} archived requests")
        twice = conn.execute(
            "select request_id, dedupe_key, count(*) as n from generation_events "
            "group by request_id, dedupe_key having count(*) > 1"
        ).fetchall()
        if twice:
            mismatches.append(f"{len(twice)} events stored twice, e.g. {twice[0]['request_id']}")
        per_item = conn.execute(
            "select i.id, count(g.request_id) filter (where g.duplicate_of is null) as n "
            "from batch_items i left join generations g on g.batch_item_id = i.id "
            "group by i.id having count(g.request_id) filter (where g.duplicate_of is null) <> 1"
        ).fetchall()
        if per_item:
            mismatches.append(f"{len(per_item)} items without exactly one request of their own")
        items = one_row(conn.execute("select count(*) as n from batch_items"))["n"]
        if items != run.config.rows:
            mismatches.append(f"{items} batch items for {run.config.rows} rows")
        orphans = one_row(conn.execute("select count(*) as n from fal_orphan_requests"))["n"]
        if orphans:
            mismatches.append(f"{orphans} requests at fal unadopted (fal_orphan_requests)")
        adopted = one_row(
            conn.execute(
                "select count(*) as n from generations g join batch_items i "
                "on i.id = g.batch_item_id where g.duplicate_of is not null"
            )
        )["n"]
        waiting = one_row(
            conn.execute("select count(*) as n from generation_events where applied_at is null")
        )["n"]
        if waiting:
            mismatches.append(f"{waiting} webhook events never applied")
        conn.commit()
        months = conn.execute(
            "select distinct date_trunc('month', created_at at time zone 'UTC')::date as m "
            "from generations"
        ).fetchall()
        for month in (r["m"] for r in months):
            refresh_month(conn, month, rebuild=True)
            conn.commit()
            for by in ("user", "endpoint"):
                finding = report_matches_ledger(conn, month, by, margin="0 seconds")
                if not finding.passed:
                    mismatches.append(f"{month:%Y-%m} report by {by}: {finding.summary}")
        run.counts["report_checks"] = 2 * len(months)

    decisions = [t["decisions"] for t in truth.values()]
    faults = health["api_faults"]
    delivered = Counter(a["outcome"] for a in attempts)
    rows_table = [
        FaultRow(
            "model errors (ERROR webhook, 422)",
            sum(1 for t in truth.values() if t["status"] == "failed"),
            "ledger failed, cost 0",
        ),
        FaultRow(
            "payload errors (OK webhook, payload null)",
            sum(1 for d in decisions if d["payload_error"]),
            "reconciler fetched the result",
        ),
        FaultRow(
            "re-queues (new gateway id)",
            sum(d.get("requeues", 0) for d in decisions),
            "one request, one row",
        ),
        FaultRow(
            "duplicate webhooks",
            len({a["request_id"] for a in attempts if a.get("copy") == 1}),
            "event dedupe key",
        ),
        FaultRow(
            "out-of-order webhooks",
            sum(1 for d in decisions if d["out_of_order"]),
            "the ledger's state machine (one ending)",
        ),
        FaultRow(
            "early webhooks (before submit answered)",
            sum(1 for d in decisions if d["early"]),
            "stored waiting, applied with the row",
        ),
        FaultRow("dropped webhooks", delivered["dropped"], "reconciler asked fal"),
        FaultRow(
            "429s",
            int(faults.get("429", 0)),
            "fal-client / gateway retries",
        ),
        FaultRow(
            "edge 502/503/504",
            sum(int(faults.get(c, 0)) for c in ("502", "503", "504")),
            "fal-client / gateway retries",
        ),
        FaultRow(
            "fal JSON 500 (submit enqueued anyway)",
            int(faults.get("500", 0)),
            "outcome unknown; fal's request id or adoption names it",
        ),
        FaultRow(
            "lost submit answers (one submit, two requests)",
            int(faults.get("lost_answer", 0)),
            f"{adopted} rows recorded as duplicate_of, cancel asked",
        ),
        FaultRow(
            "batch process killed -9, rerun",
            run.counts["batch_killed"],
            "rerun skips sent rows; adoption names the rest",
        ),
        FaultRow(
            "webhook receiver killed -9",
            run.counts["receiver_killed"],
            f"restart loop ({receiver.restarts} restarts); fal retried",
        ),
        FaultRow(
            "Postgres stopped and started",
            run.counts["postgres_stopped"],
            "receiver answered 503; fal retried",
        ),
        FaultRow(
            "webhook deliveries refused (503 / no answer)",
            delivered["failed"],
            "fal retried them",
        ),
        FaultRow(
            "Dagster run worker killed -9 (reconcile_ledger)",
            run.counts["dagster_worker_killed"],
            "its writes are per row; the next pass finished the work",
        ),
        FaultRow(
            "archive run with S3 down",
            run.counts["s3_down_runs"],
            f"{run.counts['s3_down_retrying']} rows left pending, archived on the next run",
        ),
    ]
    figures = {
        "requests_at_fal": len(truth),
        "completed": sum(1 for t in truth.values() if t["status"] == "completed"),
        "reconcile_passes": run.counts["reconcile_passes"],
        "archive_runs": run.counts["archive_runs"],
        "objects_in_s3": len(stored),
        "webhook_attempts": len(attempts),
        "refused_deliveries_by_answer": dict(
            Counter(
                str(a.get("status_code") or (a.get("error") or "")[:40])
                for a in attempts
                if a["outcome"] == "failed"
            )
        ),
    }
    return ChaosResult(rows_table, mismatches, len(truth), time.monotonic() - run.started, figures)


def render(result: ChaosResult) -> Any:
    """The one screen: a rich table of faults, then the verdict."""

    table = Table(title=f"make chaos: {result.requests} requests at fal, {result.seconds:.0f} s")
    table.add_column("fault")
    table.add_column("fired", justify="right")
    table.add_column("absorbed by")
    for row in result.faults:
        table.add_row(row.fault, str(row.fired), row.absorbed_by)
    verdict = (
        "ledger == fal's ground truth: status, cost to the µ$, archived sha256; nothing "
        "stored twice; no orphans; reports == ledger"
        if result.ok
        else f"{len(result.mismatches)} MISMATCHES"
    )
    table.caption = verdict
    return table


def main(argv: list[str] | None = None) -> int:
    """`python -m renderqueue_pipeline.chaos [--rows N] [--seed S]`: exit 1 on any mismatch."""

    parser = argparse.ArgumentParser(prog="renderqueue-chaos")
    parser.add_argument("--rows", type=int, default=ChaosConfig.rows)
    parser.add_argument("--seed", type=int, default=ChaosConfig.seed)
    parser.add_argument("--home", type=Path, default=Path(".renderqueue/chaos"))
    args = parser.parse_args(argv)
    console = Console()
    config = ChaosConfig(rows=args.rows, seed=args.seed, kill_batch_at=max(4, args.rows // 6))
    try:
        result = run_chaos(
            args.home.resolve(),
            config,
            say=lambda line: console.print(f"[dim]{escape(line)}[/dim]"),
        )
    except ChaosError as exc:
        console.print(f"[red]chaos run stopped:[/red] {escape(str(exc))}")
        return 1
    console.print(render(result))
    for line in result.mismatches[:40]:
        console.print(f"[red]mismatch[/red] {escape(line)}")
    console.print(f"figures: {result.figures}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
