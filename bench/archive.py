"""Archive throughput and memory: 50 x 20 MB outputs from the simulator's CDN.

The fal simulator runs as its own process and serves the outputs of 50 Seedance requests
(about 20 MB each, 720p, `size_scale`) from its CDN over TLS. Baseline: plain httpx
streaming each URL to a local file, 4 at a time, in a child process. Measured, in child
processes too: `archive_pending` (claim, safe fetch, sha256, staged write, move, record)
into `file://`, 4 rows at a time, alternated with the baseline over 3 rounds; the
medians of the rounds are compared. Into moto's S3 server (its own process, through
s3fs) the baseline is plain httpx streaming into the same server through s3fs with the
same part size (3 rounds each, alternated, medians compared). Peak memory
is the child's peak RSS (VmHWM), for the 50-output runs and for one output of about
1 GB; the limit is 200 MB.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import httpx
import s3fs
from rich.console import Console

from bench.common import BENCH_HOME, REPEATS, Figure, note, scaled, scratch_ledger
from bench.memory import peak_rss_mb
from renderqueue_pipeline.archive import ArchiveOptions, ArchiveStorage, archive_pending
from renderqueue_pipeline.archive.fetch import FetchPolicy, parse_hosts
from renderqueue_pipeline.archive.storage import UPLOAD_BLOCK_BYTES
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.serving import free_port

OUTPUTS = scaled(50, 4)  # at least CONCURRENCY: every worker has an output
TARGET_BYTES = 20_000_000
LARGE_BYTES = scaled(1_000_000_000, 50_000_000)
CONCURRENCY = 4
FILE_ROUNDS = REPEATS
S3_ROUNDS = REPEATS
ENDPOINT = "bytedance/seedance-2.0/text-to-video"
MEMORY_LIMIT_MB = 200.0
BASE_VIDEO_BYTES = 2_500_000 * 5 / 8  # the simulator's 720p bitrate x 5 s


def _cpu_seconds() -> float:

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ----- child processes -----------------------------------------------------------------------


def _baseline(job: dict[str, Any]) -> dict[str, Any]:
    """Plain httpx: stream every URL into a local file, CONCURRENCY at a time."""
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    client = httpx.Client(
        verify=job["ca_bundle"],
        timeout=120,
        trust_env=False,
        limits=httpx.Limits(max_connections=CONCURRENCY * 2),
    )

    def fetch(item: tuple[int, str]) -> int:
        i, url = item
        written = 0
        with client.stream("GET", url) as response, open(out / f"{i}.mp4", "wb") as f:
            response.raise_for_status()
            for chunk in response.iter_raw():
                f.write(chunk)
                written += len(chunk)
        return written

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        total = sum(pool.map(fetch, enumerate(job["urls"])))
    seconds = time.perf_counter() - started
    return {
        "bytes": total,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "cpu_seconds": _cpu_seconds(),
    }


def _plain_s3(job: dict[str, Any]) -> dict[str, Any]:
    """Plain httpx streaming into S3 through s3fs (same part size), no checks, no ledger."""

    fs = s3fs.S3FileSystem()
    client = httpx.Client(
        verify=job["ca_bundle"],
        timeout=120,
        trust_env=False,
        limits=httpx.Limits(max_connections=CONCURRENCY * 2),
    )

    def fetch(item: tuple[int, str]) -> int:
        i, url = item
        written = 0
        with (
            client.stream("GET", url) as response,
            fs.open(f"{job['prefix']}/{i}.mp4", "wb", block_size=UPLOAD_BLOCK_BYTES) as f,
        ):
            response.raise_for_status()
            for chunk in response.iter_raw():
                f.write(chunk)
                written += len(chunk)
        return written

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        total = sum(pool.map(fetch, enumerate(job["urls"])))
    seconds = time.perf_counter() - started
    return {
        "bytes": total,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "cpu_seconds": _cpu_seconds(),
    }


def _archive(job: dict[str, Any]) -> dict[str, Any]:
    """archive_pending over every due row of the ledger."""

    storage = ArchiveStorage.from_url(job["storage"])
    policy = FetchPolicy(loopback_hosts=parse_hosts(job["loopback"]))
    started = time.perf_counter()
    report = archive_pending(
        lambda: connect(job["ledger"]), storage, policy, ArchiveOptions(concurrency=CONCURRENCY)
    )
    seconds = time.perf_counter() - started
    summary = report.as_dict()
    return {
        "bytes": summary["bytes"],
        "seconds": seconds,
        "archived": summary["archived"],
        "failures": summary["failures_by_reason"],
        "peak_rss_mb": peak_rss_mb(),
        "cpu_seconds": _cpu_seconds(),
    }


def _child(mode: str, job: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.archive", mode, json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.archive {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----- the fal simulator and moto, each in its own process --------------------------------------


class _Process:
    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT, text=True
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout} s")


def _start_simulator(home: Path) -> tuple[_Process, str, str, str]:
    """The simulator as its own process: (process, host, CA bundle, its printed FAL_KEY)."""
    log = home / "simulator.log"
    process = _Process(
        [
            str(Path(sys.executable).parent / "renderqueue"),
            "simulator",
            "serve",
            "--port",
            "0",
            "--queue-delay",
            "0",
            "--run-time",
            "0",
        ],
        {"RENDERQUEUE_HOME": str(home)},
        log,
    )

    def port() -> str | None:
        found = re.search(r"FAL_QUEUE_RUN_HOST='([^']+)'", log.read_text())
        return found.group(1) if found else None

    host = _wait_for(port, 60, "fal simulator")
    bundle = str(home / "simulator" / "ca-bundle.pem")
    _wait_for(lambda: _ok(f"https://{host}/_sim/health", bundle), 60, "fal simulator")
    fal_key = re.search(r"FAL_KEY='([^']+)'", log.read_text())
    assert fal_key, "the simulator printed no FAL_KEY"
    return process, host, bundle, fal_key.group(1)


def _ok(url: str, verify: str | bool = False) -> bool:
    try:
        return httpx.get(url, verify=verify, timeout=2, trust_env=False).status_code < 500
    except httpx.HTTPError:
        return False


def _outputs(host: str, bundle: str, key: str, count: int, size: int) -> list[dict[str, Any]]:
    """Submit `count` requests sized to about `size` bytes; their fal outputs."""
    with httpx.Client(
        base_url=f"https://{host}",
        verify=bundle,
        timeout=60,
        trust_env=False,
        headers={"authorization": f"Key {key}"},
    ) as http:
        http.patch("/_sim/config", json={"size_scale": size / BASE_VIDEO_BYTES}).raise_for_status()
        inputs = {"prompt": "a slow pan over a harbour", "duration": "5", "resolution": "720p"}
        handles = []
        for _ in range(count):
            response = http.post(f"/{ENDPOINT}", json=inputs)
            response.raise_for_status()
            handles.append(response.json())
        outputs = []
        for handle in handles:

            def result(url: str = handle["response_url"]):
                r = http.get(url)
                return r.json() if r.status_code == 200 else None

            outputs.append(
                {
                    "request_id": handle["request_id"],
                    "payload": _wait_for(result, 120, "simulator result"),
                }
            )
        return outputs


def _load_rows(ledger: str, outputs: list[dict[str, Any]]) -> None:
    """Completed generations with these outputs, as the seed article's INSERT writes them."""

    with connect(ledger) as conn, conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "insert into generations (request_id, user_id, endpoint, inputs, outputs, status, "
            "finished_at) values (%s, 1, %s, '{\"prompt\": \"p\"}', %s, 'completed', now())",
            [(o["request_id"], ENDPOINT, json.dumps(o["payload"])) for o in outputs],
        )


def _reset_archive(ledger: str) -> None:

    with connect(ledger) as conn, conn.transaction():
        conn.execute("delete from generation_files")
        conn.execute(
            "update generations set archive_status = 'pending', archive_url = null, "
            "archive_attempts = 0, archive_next_attempt_at = null"
        )


def _start_moto(home: Path) -> tuple[_Process, str]:

    port = free_port()
    process = _Process(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        {},
        home / "moto.log",
    )
    endpoint = f"http://127.0.0.1:{port}"
    _wait_for(lambda: _ok(endpoint), 60, "moto S3 server")
    return process, endpoint


def _mb_s(result: dict[str, Any]) -> float:
    return result["bytes"] / 1e6 / result["seconds"]


def run(console: Console) -> list[Figure]:
    home = BENCH_HOME / "archive"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    simulator, host, bundle, fal_key = _start_simulator(home)
    moto = None
    s3_env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "SSL_CERT_FILE": bundle,
    }
    try:
        console.print(f"submitting {OUTPUTS} outputs of ~{TARGET_BYTES / 1e6:.0f} MB")
        outputs = _outputs(host, bundle, fal_key, OUTPUTS, TARGET_BYTES)
        urls = [o["payload"]["video"]["url"] for o in outputs]
        with scratch_ledger() as ledger:
            _load_rows(ledger, outputs)
            job = {"ledger": ledger, "loopback": host}
            base, local = [], []
            for round_ in range(1, FILE_ROUNDS + 1):  # alternated: drift hits both sides
                console.print(f"round {round_}: plain httpx streaming to local files")
                base.append(
                    _child(
                        "baseline",
                        {"urls": urls, "out": str(home / "baseline"), "ca_bundle": bundle},
                    )
                )
                shutil.rmtree(home / "baseline")
                console.print(f"round {round_}: archive into file://")
                _reset_archive(ledger)
                local.append(
                    _child(
                        "archive",
                        {**job, "storage": f"file://{home / 'store'}"},
                        {"SSL_CERT_FILE": bundle},
                    )
                )
                assert local[-1]["archived"] == OUTPUTS, local[-1]
                shutil.rmtree(home / "store")

            moto, endpoint = _start_moto(home)
            boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name="us-east-1",
                aws_access_key_id="bench",
                aws_secret_access_key="bench",
            ).create_bucket(Bucket="bench")
            s3_env["AWS_ENDPOINT_URL"] = endpoint
            s3_base, s3 = [], []
            for round_ in range(1, S3_ROUNDS + 1):
                console.print(f"round {round_}: plain httpx streaming into moto's S3 server")
                s3_base.append(
                    _child(
                        "plain_s3",
                        {"urls": urls, "prefix": "bench/plain", "ca_bundle": bundle},
                        s3_env,
                    )
                )
                _reset_archive(ledger)
                console.print(f"round {round_}: archive into moto's S3 server")
                s3.append(_child("archive", {**job, "storage": "s3://bench/archive"}, s3_env))
                assert s3[-1]["archived"] == OUTPUTS, s3[-1]
            moto.stop()
            moto = None

        console.print(f"one output of ~{LARGE_BYTES / 1e9:.0f} GB into file://")
        large_outputs = _outputs(host, bundle, fal_key, 1, LARGE_BYTES)
        with scratch_ledger() as ledger:
            _load_rows(ledger, large_outputs)
            large = _child(
                "archive",
                {"ledger": ledger, "loopback": host, "storage": f"file://{home / 'large'}"},
                {"SSL_CERT_FILE": bundle},
            )
            assert large["archived"] == 1, large
            shutil.rmtree(home / "large")
    finally:
        if moto is not None:
            moto.stop()
        simulator.stop()

    # every round of each side; the figures compare the medians (common.Figure.of_runs)
    base_mb_s, local_mb_s = list(map(_mb_s, base)), list(map(_mb_s, local))
    s3_base_mb_s, s3_mb_s = list(map(_mb_s, s3_base)), list(map(_mb_s, s3))
    local_peak = max(r["peak_rss_mb"] for r in local)
    s3_peak = max(r["peak_rss_mb"] for r in s3)
    note(
        console,
        "MB/s per round: "
        + f"baseline {[round(_mb_s(r), 1) for r in base]}, "
        + f"archive file {[round(_mb_s(r), 1) for r in local]}, "
        + f"plain S3 {[round(_mb_s(r), 1) for r in s3_base]}, "
        + f"archive S3 {[round(_mb_s(r), 1) for r in s3]}; peak RSS file "
        + f"{local_peak:.0f} MB, S3 {s3_peak:.0f} MB (plain "
        + f"{max(r['peak_rss_mb'] for r in s3_base):.0f} MB), {large['bytes'] / 1e9:.2f} GB "
        + f"output {large['peak_rss_mb']:.0f} MB at {_mb_s(large):.1f} MB/s",
    )
    to_file = f"plain httpx to a local file, {CONCURRENCY} at a time"
    to_s3 = f"plain httpx into moto S3 via s3fs, {CONCURRENCY} at a time"
    limit = f"limit {MEMORY_LIMIT_MB:.0f} MB"
    return [
        Figure.of_runs(
            f"archive {OUTPUTS} x 20 MB into file://",
            local_mb_s,
            to_file,
            base_mb_s,
            unit="MB/s",
            required=0.8,
        ),
        Figure.of_runs(
            f"archive {OUTPUTS} x 20 MB into moto S3",
            s3_mb_s,
            to_s3,
            s3_base_mb_s,
            unit="MB/s",
            required=0.8,
        ),
        Figure.of_runs(
            f"archive {OUTPUTS} x 20 MB into moto S3 (vs local file)",
            s3_mb_s,
            to_file,
            base_mb_s,
            unit="MB/s",
        ),
        Figure(
            f"peak RSS, {OUTPUTS} x 20 MB into file://",
            local_peak,
            limit,
            MEMORY_LIMIT_MB,
            unit="MB",
            required=1.0,
            higher_is_better=False,
        ),
        Figure(
            f"peak RSS, {OUTPUTS} x 20 MB into moto S3",
            s3_peak,
            limit,
            MEMORY_LIMIT_MB,
            unit="MB",
            required=1.0,
            higher_is_better=False,
        ),
        Figure(
            f"peak RSS, one {large['bytes'] / 1e9:.2f} GB output into file://",
            large["peak_rss_mb"],
            limit,
            MEMORY_LIMIT_MB,
            unit="MB",
            required=1.0,
            higher_is_better=False,
        ),
    ]


if __name__ == "__main__":
    mode, payload = sys.argv[1], json.loads(sys.argv[2])
    result = {"baseline": _baseline, "plain_s3": _plain_s3, "archive": _archive}[mode](payload)
    print(json.dumps(result))
