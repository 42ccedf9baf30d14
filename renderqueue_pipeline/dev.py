"""`renderqueue dev`: the whole product on one machine, in the Dagster UI.

Starts, on the embedded defaults: Postgres, the fal simulator, the webhook receiver, and
Dagster (webserver and daemon on Postgres storage). Each runs as its own process, the way a
deployment runs them; Ctrl-C stops every one of them and the embedded server it started.
With FAL_KEY / DATABASE_URL set, the simulator / embedded server are not started.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape

from renderqueue_pipeline.alerts import alert_arguments, evaluate_budget_alerts
from renderqueue_pipeline.dagster_home import ensure_dagster_home
from renderqueue_pipeline.db import one_row
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.db.roles import dev_logins
from renderqueue_pipeline.db.server import database_url, stop_embedded
from renderqueue_pipeline.demo import (
    demo_alert_webhook,
    print_received_alerts,
    print_summary,
    submitted_request_ids,
)
from renderqueue_pipeline.demo_data import SAMPLE_PROMPTS, drop_sample_prompts, prepare_demo_ledger
from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.redact import redact
from renderqueue_pipeline.settings import get_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def _bin(name: str) -> str:
    """A console script of this environment (beside the running Python), else PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise RenderqueueError(f"{name} is not installed in this environment")
    return found


@dataclass
class Supervisor:
    """Child processes in their own process groups; `stop()` ends them all, newest first."""

    log_dir: Path
    children: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(  # noqa: S603 - our own programs, argv built here
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.children.append((name, process))
        return process

    def check(self) -> None:
        """Raise with the log's tail when a child died on its own."""
        for name, process in self.children:
            if process.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RenderqueueError(
                    f"{name} exited with code {process.returncode}; last lines of "
                    f"{self.log_dir / (name + '.log')}:\n{tail}"
                )

    def stop(self, timeout: float = 15.0) -> None:
        for _, process in reversed(self.children):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, process in reversed(self.children):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # whatever a leader left behind in its group (a code server the daemon started as
        # it was shutting down) goes too: nothing outlives `renderqueue dev`
        for _, process in self.children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        self.children.clear()


def wait_for_http(url: str, supervisor: Supervisor, timeout: float = 120.0, **kw) -> None:
    """Poll `url` until it answers below 500 (a child dying stops the wait at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        supervisor.check()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0, **kw).status_code < 500:
                return
        time.sleep(0.5)
    raise RenderqueueError(f"{url} did not answer within {timeout:.0f} s")


def read_exports(process: subprocess.Popen, log: Path, timeout: float = 60.0) -> dict[str, str]:
    """The `export K=V` lines the simulator prints at start (it binds port 0 first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RenderqueueError(f"fal simulator exited: {log.read_text()[-2000:]}")
        text = log.read_text() if log.exists() else ""
        if "# fal simulator serving" in text:
            env: dict[str, str] = {}
            for line in text.splitlines():
                if line.startswith("export "):
                    key, _, value = line.removeprefix("export ").partition("=")
                    env[key] = value.strip().strip("'\"")
            return env
        time.sleep(0.2)
    raise RenderqueueError("fal simulator did not start within 60 s")


RECEIVER_SERVING = "# webhook receiver serving on "


def read_receiver_url(process: subprocess.Popen, log: Path, timeout: float = 60.0) -> str:
    """The base URL `webhook serve` prints once bound (with `--port 0`, the port it got)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        for line in text.splitlines():
            if line.startswith(RECEIVER_SERVING):
                return line.removeprefix(RECEIVER_SERVING).strip()
        if process.poll() is not None:
            raise RenderqueueError(f"webhook receiver exited: {text[-2000:]}")
        time.sleep(0.1)
    raise RenderqueueError(f"webhook receiver did not start within {timeout:.0f} s")


@contextlib.contextmanager
def running_stack(
    home: Path,
    *,
    console: Console,
    ui: bool = True,
    ui_port: int = 3000,
    webhook_ports: tuple[int, ...] = (8787,),
    code_server_port: int | None = None,
) -> Iterator[dict[str, str]]:
    """Start every process of the product; yield the environment they share.

    Migrates as the owner (`DATABASE_URL` or the embedded server's admin), then runs the
    receivers as login `rq_receiver` and Dagster as `rq_pipeline` (fresh passwords at every
    start, docs/security.md). With `code_server_port`, the code location runs as its own
    gRPC code server and the webserver and daemon reach it through a workspace file (the
    production shape);
    several `webhook_ports` start one receiver each on the same database.
    """

    settings = get_settings()
    started_embedded = settings.database_url is None
    url = database_url()  # the owner's: it migrates and makes the logins, nothing else
    migrate(url)
    logins = dev_logins(url)
    env = dict(os.environ)
    env["RENDERQUEUE_HOME"] = str(home)
    # Dagster, the CLI and whatever `renderqueue dev` runs next: the pipeline's login
    env["DATABASE_URL"] = logins["pipeline"]
    console.print("ledger logins   rq_pipeline (Dagster), rq_receiver (webhook receivers)")
    supervisor = Supervisor(home / "logs")
    try:
        if settings.fal_key is None:
            sim_log = supervisor.log_dir / "simulator.log"
            supervisor.log_dir.mkdir(parents=True, exist_ok=True)
            sim_log.write_text("")
            sim = supervisor.start(
                "simulator", [_bin("renderqueue"), "simulator", "serve", "--port", "0"], env
            )
            env.update(read_exports(sim, sim_log))
            console.print(f"fal simulator   https://{env['FAL_QUEUE_RUN_HOST']}")
        receivers = []
        receiver_env = {**env, "DATABASE_URL": logins["receiver"]}
        supervisor.log_dir.mkdir(parents=True, exist_ok=True)
        for n, port in enumerate(webhook_ports):  # port 0: any free port, read back
            name = f"webhook-{n + 1}"
            (supervisor.log_dir / f"{name}.log").write_text("")  # no earlier run's port
            process = supervisor.start(
                name,
                [_bin("renderqueue"), "webhook", "serve", "--port", str(port)],
                receiver_env,
            )
            receivers.append(read_receiver_url(process, supervisor.log_dir / f"{name}.log"))
        for base in receivers:
            wait_for_http(f"{base}/healthz", supervisor)
            console.print(f"webhook receiver {base}/webhooks/fal")
        env.setdefault("RENDERQUEUE_WEBHOOK_URL", f"{receivers[0]}/webhooks/fal")
        dagster_home = ensure_dagster_home(url)
        env["DAGSTER_HOME"] = str(dagster_home)
        workspace = str(REPO_ROOT / "workspace.yaml")
        if code_server_port is not None:
            workspace = str(_grpc_workspace(dagster_home, code_server_port))
            supervisor.start(
                "code-server",
                [
                    _bin("dagster"),
                    "code-server",
                    "start",
                    "-m",
                    "renderqueue_pipeline.definitions",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(code_server_port),
                ],
                env,
            )
            _wait_for_code_server(code_server_port, supervisor)
            console.print(f"code server     grpc://127.0.0.1:{code_server_port}")
        supervisor.start("dagster-daemon", [_bin("dagster-daemon"), "run", "-w", workspace], env)
        if ui:
            supervisor.start(
                "dagster-webserver",
                [_bin("dagster-webserver"), "-w", workspace, "-h", "127.0.0.1", "-p", str(ui_port)],
                env,
            )
            wait_for_http(f"http://127.0.0.1:{ui_port}/server_info", supervisor)
            console.print(f"Dagster UI      http://127.0.0.1:{ui_port}")
        # the receivers' base URLs, for callers that asked for port 0 (children never see it)
        yield {**env, "RECEIVER_URLS": " ".join(receivers)}
    finally:
        supervisor.stop()
        if started_embedded:
            stop_embedded(home)


def _wait_for_code_server(port: int, supervisor: Supervisor, timeout: float = 180.0) -> None:
    """Block until the gRPC code server answers its health check (it imports our code)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        supervisor.check()
        check = subprocess.run(  # noqa: S603 - our own programs, argv built here
            [_bin("dagster"), "api", "grpc-health-check", "-p", str(port), "-h", "127.0.0.1"],
            capture_output=True,
        )
        if check.returncode == 0:
            return
        time.sleep(1)
    raise RenderqueueError(f"the code server on port {port} did not start within {timeout:.0f} s")


def _grpc_workspace(dagster_home: Path, port: int) -> Path:
    """A workspace file that loads the code location from a gRPC code server."""
    path = dagster_home / "workspace-grpc.yaml"
    path.write_text(
        "load_from:\n"
        "  - grpc_server:\n"
        "      host: 127.0.0.1\n"
        f"      port: {port}\n"
        "      location_name: renderqueue\n"
    )
    return path


LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}
"""


def launch(ui: str, job: str, partition: str | None = None) -> str:
    """Queue a run through the webserver's GraphQL API (the daemon starts it)."""
    tags = [{"key": "dagster/partition", "value": partition}] if partition else []
    params = {
        "selector": {
            "repositoryLocationName": "renderqueue",
            "repositoryName": "__repository__",
            "jobName": job,
        },
        "runConfigData": {},
        "executionMetadata": {"tags": tags},
    }
    response = httpx.post(
        f"{ui}/graphql", json={"query": LAUNCH_RUN, "variables": {"params": params}}, timeout=60
    )
    response.raise_for_status()
    answer = response.json()["data"]["launchRun"]
    if answer["__typename"] != "LaunchRunSuccess":
        raise RenderqueueError(f"could not launch {job}: {answer}")
    return answer["run"]["runId"]


RUN_STATUS = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
RUN_ENDED = ("SUCCESS", "FAILURE", "CANCELED")


def wait_for_run(
    ui: str, run_id: str, timeout: float = 300.0, stop: Callable[[], bool] = lambda: False
) -> str:
    """Poll the webserver until a run ends (or `timeout`); its last status."""
    deadline = time.monotonic() + timeout
    status = "?"
    while time.monotonic() < deadline and not stop():
        response = httpx.post(
            f"{ui}/graphql",
            json={"query": RUN_STATUS, "variables": {"id": run_id}},
            timeout=60,
        )
        response.raise_for_status()
        status = (response.json().get("data") or {}).get("runOrError", {}).get("status", "?")
        if status in RUN_ENDED:
            break
        time.sleep(1)
    return status


def wait_for_sample_batch(url: str, stop: Callable[[], bool]) -> list[int]:
    """Batches of the sample file once done and every one of their rows is terminal."""
    with connect(url, autocommit=True) as conn:
        while not stop():
            rows = conn.execute(
                q("demo_sample_batches"), {"source_pattern": f"%{SAMPLE_PROMPTS}"}
            ).fetchall()
            if rows and all(r["status"] != "open" and r["open"] == 0 for r in rows):
                return [r["id"] for r in rows]
            time.sleep(2)
    return []


def run_dev(
    console: Console | None = None, *, ui_port: int = 3000, production_shape: bool = False
) -> None:
    """Start everything, drop the sample prompts, print where to look; Ctrl-C stops all."""

    console = console or Console()
    settings = get_settings()
    home = settings.home_dir
    home.mkdir(parents=True, exist_ok=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    previous = signal.signal(signal.SIGTERM, _stop)
    shape: dict[str, Any] = (
        {"code_server_port": 4000, "webhook_ports": (8787, 8788)} if production_shape else {}
    )
    try:
        with (
            demo_alert_webhook(console) as alert_receiver,
            running_stack(home, console=console, ui_port=ui_port, **shape) as env,
        ):
            url = env["DATABASE_URL"]
            prepare_demo_ledger(url)
            target = drop_sample_prompts(settings.prompts)
            ui = f"http://127.0.0.1:{ui_port}"
            console.print(f"sample prompts  {escape(str(target))}", soft_wrap=True)
            console.print(
                "\n[bold]Open[/bold] (the sensors pick the file up within a minute)\n"
                f"  {ui}/runs         the submit_batch run: counts and rejected rows\n"
                f"  {ui}/automation   sensors and schedules, all running\n"
                f"  {ui}/assets       archive, monthly spend (checks, chart), billing\n"
                f"logs of every process: {escape(str(home / 'logs'))}\n"
                "Ctrl-C stops everything.\n",
                soft_wrap=True,
            )
            batch_ids = wait_for_sample_batch(url, lambda: stop)
            if batch_ids and not stop:
                today = dt.datetime.now(dt.UTC).date()
                month = today.replace(day=1).isoformat()
                # billing first, then the month's report (which then shows fal's bill);
                # each waited for, so the summary below reads what they wrote
                for job, partition in (
                    ("reconcile_billing", today.isoformat()),
                    ("summarize_billing_month", month),
                    ("spend_report", month),
                ):
                    try:
                        run_id = launch(ui, job, partition)
                        console.print(f"launched {job} ({partition})")
                        status = wait_for_run(ui, run_id, stop=lambda: stop)
                        console.print(f"{job}: {status.lower()}")
                    except (RenderqueueError, httpx.HTTPError) as exc:
                        console.print(f"[yellow]{job} not launched: {escape(redact(exc))}")
                request_ids = submitted_request_ids(url, batch_ids)
                with connect(url) as conn:
                    deadline = time.monotonic() + 180  # the archive sensor ticks every minute
                    while not stop and time.monotonic() < deadline:
                        left = one_row(
                            conn.execute(
                                q("demo_open_and_unarchived"), {"request_ids": request_ids}
                            )
                        )["unarchived"]
                        conn.rollback()
                        if left == 0:
                            break
                        time.sleep(2)
                # the daemon's budget_alert_sensor may have sent them already: once each
                with connect(url) as conn:
                    evaluate_budget_alerts(conn, **alert_arguments(settings))
                print_received_alerts(alert_receiver, console)
                print_summary(url, batch_ids, request_ids, None, console)
            while not stop:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        console.print("stopped every process renderqueue started")
