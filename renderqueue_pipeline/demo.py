"""`renderqueue demo --headless`: the product's whole flow, to completion, without the UI.

The same sensors, jobs and assets the Dagster UI runs, executed in this process on a
Postgres-backed Dagster instance: the prompts inbox sensor sees the sample file, the
`submit_batch` run submits it to the local fal simulator (real TLS, real fal-client), the
webhook receiver records the outcomes, then the reconciler, the archiver, the monthly
spend reports and fal's billing reconciliation run. It exits 0 only when the ledger
matches the simulator's ground truth.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from dagster import DagsterInstance
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from renderqueue_pipeline.alerts import alerts_for_month, url_label
from renderqueue_pipeline.alerts.receiver import local_alert_receiver
from renderqueue_pipeline.dagster_home import ensure_dagster_home
from renderqueue_pipeline.db import one_row
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.db.server import database_url
from renderqueue_pipeline.definitions import defs as defs_loader
from renderqueue_pipeline.defs.alerts.resources import AlertsResource
from renderqueue_pipeline.defs.batch.resources import PromptsInbox
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.demo_data import drop_sample_prompts, prepare_demo_ledger
from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.ledger import ledger_now
from renderqueue_pipeline.money import dollars
from renderqueue_pipeline.serving import serve_in_thread
from renderqueue_pipeline.settings import get_settings, redact_url
from renderqueue_pipeline.simulator import platform
from renderqueue_pipeline.simulator.config import SimConfig
from renderqueue_pipeline.simulator.server import SimulatorServer
from renderqueue_pipeline.simulator.testing import SimControl
from renderqueue_pipeline.webhook.app import ReceiverConfig, create_app
from renderqueue_pipeline.webhook.limits import server_options

TERMINAL = ("completed", "failed", "canceled")


@contextmanager
def local_fal(home: Path, *, seed: int = 2, failure_rate: float = 0.1) -> Iterator[Any]:
    """The fal simulator and its Platform API in threads; fal-client pointed at them.

    Sets the environment before fal_client is imported anywhere in this process.
    """

    config = SimConfig(seed=seed, failure_rate=failure_rate)
    server = SimulatorServer(home, port=0, config=config).start()
    book = platform.BillingBook(platform.BillingConfig(seed=seed, admin_key=config.admin_key))
    api = platform.PlatformServer(home, book, port=0)
    platform.attach(server.app.state.engine, book)
    api.start()
    os.environ.update({**server.env(), **platform.platform_env("127.0.0.1", api.port)})
    get_settings.cache_clear()
    try:
        yield server
    finally:
        api.stop()
        server.stop()


@contextmanager
def demo_alert_webhook(console: Console) -> Iterator[Any]:
    """RENDERQUEUE_ALERT_WEBHOOK_URL as configured, else a local receiver for the demo.

    Yields the local receiver (None when a URL was configured: alerts go there).
    """

    configured = get_settings().alert_webhook_url
    if configured is not None:
        console.print(f"alert webhook: {url_label(configured.get_secret_value())} (configured)")
        yield None
        return
    with local_alert_receiver() as receiver:
        os.environ["RENDERQUEUE_ALERT_WEBHOOK_URL"] = receiver.url
        get_settings.cache_clear()
        console.print(f"alert receiver: {receiver.url} (local, records what it is sent)")
        try:
            yield receiver
        finally:
            os.environ.pop("RENDERQUEUE_ALERT_WEBHOOK_URL", None)
            get_settings.cache_clear()


def print_received_alerts(receiver: Any, console: Console) -> None:
    """What the demo's local alert receiver was sent (nothing when a URL was configured)."""
    if receiver is None:
        return
    console.print(f"alert receiver got {len(receiver.bodies)} posts:")
    for body in receiver.bodies:
        console.print(f"  {body.get('text', body)}", soft_wrap=True)


class Step:
    """Prints one line per step of the flow, with its time."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.monotonic()

    def __call__(self, name: str, action: Callable[[], Any]) -> Any:
        began = time.monotonic()
        self.console.print(f"[bold]{name}[/bold] ...")
        result = action()
        self.console.print(f"  done in {time.monotonic() - began:.1f} s")
        return result


def _sensor_requests(defs: Any, instance: Any) -> list[Any]:
    """Tick the prompts inbox sensor until it requests runs (a file waits one tick)."""

    sensor = defs.resolve_sensor_def("prompts_inbox_sensor")
    cursor = None
    for _ in range(3):
        with dg.build_sensor_context(
            instance=instance,
            cursor=cursor,
            resources={"prompts_inbox": PromptsInbox(url=get_settings().prompts)},
        ) as context:
            result = sensor(context)
        cursor = result.cursor
        if result.run_requests:
            return list(result.run_requests)
        time.sleep(1.1)
    return []


def _wait_for_webhooks(url: str, request_ids: list[str], timeout: float = 90.0) -> int:
    """Wait until every submitted row is terminal (or the timeout); return how many are."""
    deadline = time.monotonic() + timeout
    done = 0
    with connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            done = one_row(
                conn.execute(
                    q("demo_terminal_count"),
                    {"request_ids": request_ids, "statuses": list(TERMINAL)},
                )
            )["n"]
            if done == len(request_ids):
                break
            time.sleep(0.3)
    return done


QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _execute(
    defs: Any, instance: Any, job: str, run_config: dict | None = None, **kwargs: Any
) -> Any:
    """One job run in this process; the run's log goes to Dagster's storage, not stdout."""
    result = defs.resolve_job_def(job).execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_config={**(run_config or {}), **QUIET},
        **kwargs,
    )
    if not result.success:
        failures = [e.message for e in result.all_events if e.is_failure]
        raise RuntimeError(f"{job} failed: {failures[:3]}")
    return result


@contextmanager
def real_fal(console: Console) -> Iterator[None]:
    """FAL_KEY is set: fal (or whatever FAL_QUEUE_RUN_HOST names) and the receiver that
    RENDERQUEUE_WEBHOOK_URL reaches are already running; start neither here."""

    settings = get_settings()
    if not settings.webhook_url:
        raise RenderqueueError(
            "RENDERQUEUE_WEBHOOK_URL: with FAL_KEY set, fal needs the public URL of your "
            "running webhook receiver (renderqueue webhook serve)"
        )
    host = os.environ.get("FAL_QUEUE_RUN_HOST", "queue.fal.run")
    console.print(f"fal: {escape(host)} (FAL_KEY set; no simulator started)")
    console.print(f"webhook receiver: {escape(str(settings.webhook_url))} (already running)")
    yield


def run_headless(console: Console | None = None) -> bool:
    """Run the whole flow; True when the ledger matches the simulator's ground truth
    (with FAL_KEY set: when every generation ended and every output was archived)."""

    console = console or Console()
    step = Step(console)
    home = get_settings().home_dir
    home.mkdir(parents=True, exist_ok=True)
    url = database_url()
    console.print(f"ledger database: {escape(redact_url(url))}")
    migrate(url)
    with demo_alert_webhook(console) as alert_receiver:
        if get_settings().fal_key is not None:
            with real_fal(console):
                batch_ids, request_ids = _flow(url, defs_loader, console, step)
            print_received_alerts(alert_receiver, console)
            return print_summary(url, batch_ids, request_ids, None, console) and _all_done(
                url, request_ids, console
            )
        return _headless_local(url, home, defs_loader, console, step, alert_receiver)


def _headless_local(
    url: str, home: Path, defs_loader: Any, console: Console, step: Step, alert_receiver: Any
) -> bool:
    """The flow against the local fal simulator, checked against its ground truth."""

    started = _ledger_now(url)
    with local_fal(home) as fal:
        console.print(f"fal simulator: {fal.base_url} (no fal account, nothing billed)")
        receiver_app = create_app(ReceiverConfig(url, os.environ["FAL_JWKS_URL"]))
        with serve_in_thread(receiver_app, **server_options()) as receiver:
            os.environ["RENDERQUEUE_WEBHOOK_URL"] = f"{receiver}/webhooks/fal"
            get_settings.cache_clear()
            console.print(f"webhook receiver: {receiver}/webhooks/fal")
            batch_ids, request_ids = _flow(url, defs_loader, console, step)
        truth = SimControl(fal.base_url, fal.bundle)
        try:
            truths = {t["request_id"]: t for t in truth.ground_truth()}
        finally:
            truth.close()
    print_received_alerts(alert_receiver, console)
    return print_summary(url, batch_ids, request_ids, truths, console, started)


def _flow(url: str, load_defs: Any, console: Console, step: Step) -> tuple[list[int], list[str]]:
    """Inbox sensor, batch, webhooks, reconcile, archive, reports, billing: in this process."""

    prepare_demo_ledger(url)
    target = drop_sample_prompts(get_settings().prompts)
    console.print(f"sample prompts: {escape(str(target))}")
    ensure_dagster_home(url)
    defs = load_defs()
    with DagsterInstance.get() as instance:
        requests = step("prompts_inbox_sensor", lambda: _sensor_requests(defs, instance))
        batch_ids = []
        for request in requests:
            run = step(
                f"submit_batch ({request.tags.get('renderqueue/file', '')})",
                lambda request=request: _execute(
                    defs,
                    instance,
                    "submit_batch",
                    run_config=request.run_config,
                    tags=request.tags,
                ),
            )
            batch_ids.append(run.output_for_node("submit_prompts_file"))
        request_ids = submitted_request_ids(url, batch_ids)
        done = step(
            f"webhooks for {len(request_ids)} generations",
            lambda: _wait_for_webhooks(url, request_ids),
        )
        console.print(f"  {done}/{len(request_ids)} terminal from fal's webhooks")
        step(
            "reconcile_ledger",
            lambda: _execute(
                defs,
                instance,
                "reconcile_ledger",
                run_config={"ops": {"reconcile_open_rows": {"config": {"min_age_minutes": 0}}}},
            ),
        )
        step("archive_outputs", lambda: _execute(defs, instance, "archive_outputs"))
        today = dt.datetime.now(dt.UTC).date()
        step(
            "reconcile_billing (today)",
            lambda: _execute(defs, instance, "reconcile_billing", partition_key=today.isoformat()),
        )
        step(
            "summarize_billing_month",
            lambda: _execute(
                defs,
                instance,
                "summarize_billing_month",
                partition_key=today.replace(day=1).isoformat(),
            ),
        )
        # after the billing: the month's report shows ours, fal's bill and the difference
        _materialize_reports(defs, instance, today, step)
        step("budget_alert_sensor", lambda: _tick_budget_alerts(defs, instance, console))
    return batch_ids, request_ids


def _tick_budget_alerts(defs: Any, instance: Any, console: Console) -> None:
    """One tick of the budget alert sensor (the daemon's, run here): thresholds crossed."""

    sensor = defs.resolve_sensor_def("budget_alert_sensor")
    settings = get_settings()
    resources = {
        "ledger": LedgerDatabase.from_settings(settings),
        "alerts": AlertsResource.from_settings(settings),
    }
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        result = sensor(context)
    console.print(f"  {getattr(result, 'skip_message', result)}", soft_wrap=True)


def _all_done(url: str, request_ids: list[str], console: Console) -> bool:
    """Without ground truth: every generation ended and every completed one is archived."""
    with connect(url) as conn:
        left = one_row(conn.execute(q("demo_open_and_unarchived"), {"request_ids": request_ids}))
    if left["open"] or left["unarchived"]:
        console.print(f"[red]{left['open']} still open, {left['unarchived']} not archived")
        return False
    console.print(f"[green]all {len(request_ids)} generations ended; outputs archived[/green]")
    return bool(request_ids)


def _materialize_reports(defs: Any, instance: Any, today: dt.date, step: Step) -> None:
    """The current month's spend reports, when the reports domain is installed."""
    try:
        defs.resolve_job_def("spend_report")
    except Exception:  # noqa: BLE001 - Dagster raises its own error kinds for a missing job
        return
    step(
        "spend_report (this month)",
        lambda: _execute(
            defs,
            instance,
            "spend_report",
            partition_key=today.replace(day=1).isoformat(),
        ),
    )


def submitted_request_ids(url: str, batch_ids: list[int]) -> list[str]:
    """The request ids the batches' items were sent as, in item order."""
    with connect(url) as conn:
        rows = conn.execute(q("demo_batch_request_ids"), {"batch_ids": batch_ids}).fetchall()
    return [r["request_id"] for r in rows]


def check_against_truth(
    url: str, request_ids: list[str], truths: dict[str, dict[str, Any]]
) -> list[str]:
    """Every difference between the ledger and the simulator's decisions, as sentences."""
    problems: list[str] = []
    with connect(url) as conn:
        for request_id in request_ids:
            row = conn.execute(
                q("demo_generation_for_truth"), {"request_id": request_id}
            ).fetchone()
            truth = truths.get(request_id)
            if truth is None or row is None:
                problems.append(f"{request_id}: missing on one side")
                continue
            if row["status"] != truth["status"]:
                problems.append(f"{request_id}: ledger {row['status']}, fal {truth['status']}")
            if row["status"] != "completed" and row["cost_micros"] != 0:
                problems.append(f"{request_id}: {row['status']} but costs {row['cost_micros']}")
            if row["status"] == "completed" and row["archive_status"] != "archived":
                problems.append(f"{request_id}: completed but archive is {row['archive_status']}")
    return problems


def _ledger_now(url: str) -> dt.datetime:
    with connect(url) as conn:
        return ledger_now(conn)


def _submitted_before(url: str, request_ids: list[str], started: dt.datetime) -> set[str]:
    """Request ids whose generation row was written before this run started."""
    with connect(url) as conn:
        rows = conn.execute(
            q("demo_written_before"), {"request_ids": request_ids, "started": started}
        ).fetchall()
    return {r["request_id"] for r in rows}


# one line per figure of the summary, in the order printed
def print_summary(  # noqa: C901
    url: str,
    batch_ids: list[int],
    request_ids: list[str],
    truths: dict[str, dict[str, Any]] | None,
    console: Console,
    started: dt.datetime | None = None,
) -> bool:
    """The one-screen summary; True when the ledger matches the ground truth (if given)."""

    settings = get_settings()
    with connect(url) as conn:
        requests = {"request_ids": request_ids}
        by_status = conn.execute(q("demo_summary_by_status"), requests).fetchall()
        rejected = conn.execute(q("demo_summary_rejected"), {"batch_ids": batch_ids}).fetchall()
        by_user = conn.execute(q("demo_summary_by_user"), requests).fetchall()
        archived = one_row(conn.execute(q("demo_summary_archived"), requests))
        billing = conn.execute(q("demo_summary_cost_basis"), requests).fetchall()
        lengths = one_row(conn.execute(q("demo_summary_lengths"), requests))
        today = dt.datetime.now(dt.UTC).date()  # the day the demo ran the billing check for
        month_report = conn.execute(q("report_month"), {"month": today.replace(day=1)}).fetchone()
        alerts = alerts_for_month(conn)
        billing_days = conn.execute(q("demo_summary_billing_day"), {"day": today}).fetchall()
    table = Table(title="generations by status")
    for column in ("status", "generations", "cost"):
        table.add_column(column)
    for r in by_status:
        table.add_row(r["status"], str(r["n"]), dollars(r["c"]))
    console.print(table)
    if rejected:
        bad = Table(title="rejected rows")
        bad.add_column("line")
        bad.add_column("why")
        for r in rejected:
            bad.add_row(str(r["line_no"]), escape(r["reason"]))
        console.print(bad)
    users = Table(title="spend by user")
    for column in ("user", "generations", "cost"):
        users.add_column(column)
    for r in by_user:
        users.add_row(str(r["user_id"]), str(r["n"]), dollars(r["c"]))
    console.print(users)
    console.print(
        f"archived: {archived['n']} outputs, {archived['b']:,} bytes under "
        f"{escape(settings.storage)}/generations/"
    )
    month = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    console.print(f"spend reports: {escape(settings.storage)}/reports/spend/{month}/")
    console.print(
        "cost basis of completed rows: " + ", ".join(f"{r['cost_basis']} {r['n']}" for r in billing)
    )
    console.print(
        f"clip lengths read from the archived files: {lengths['measured']} measured, "
        f"{lengths['unreadable']} unreadable (those keep their estimate)"
    )
    if billing_days:
        bills = Table(title="fal's bill against the ledger (today, UTC)")
        for column in ("outcome", "requests", "ours (computed)", "fal billed"):
            bills.add_column(column)
        for r in billing_days:
            bills.add_row(r["outcome"], str(r["n"]), dollars(r["ours"]), dollars(r["fal"]))
        console.print(bills)
    if month_report is not None and month_report["fal_billed_micros"] is not None:
        console.print(
            f"month's report: ours {dollars(month_report['computed_micros'])}, fal billed "
            f"{dollars(month_report['fal_billed_micros'])} for "
            f"{month_report['billed_generations']} generations, difference "
            f"{dollars(month_report['billed_difference_micros'])} (fal minus ours)"
        )
    if alerts:
        sent = Table(title=f"budget alerts ({alerts[0]['month']:%Y-%m}, once per threshold)")
        for column in ("user", "threshold", "spent + in flight", "budget", "delivered"):
            sent.add_column(column)
        for a in alerts:
            delivered = (
                f"{a['delivered_at']:%H:%M:%S} UTC"
                if a["delivered_at"]
                else f"no ({a['attempts']} attempts: {a['last_error']})"
            )
            sent.add_row(
                str(a["user_id"]),
                f"{a['threshold_percent']}%",
                dollars(a["actual_micros"] + a["in_flight_micros"]),
                dollars(a["limit_micros"]),
                delivered,
            )
        console.print(sent)
    if truths is None:
        return True
    # This run's simulator saw only this run's requests: rows an earlier run submitted (the
    # sample file again adds nothing) cannot be checked against it, and are not counted.
    earlier = _submitted_before(url, request_ids, started) if started is not None else set()
    checked = [r for r in request_ids if r not in earlier]
    problems = check_against_truth(url, checked, truths)
    if problems:
        console.print(f"[red]the ledger differs from fal's ground truth in {len(problems)} rows:")
        for line in problems[:20]:
            console.print(f"  {escape(line)}")
        return False
    if earlier:
        console.print(
            f"{len(earlier)} generations were submitted by an earlier run (this simulator "
            "never saw them): not compared"
        )
    console.print(
        f"[green]ledger matches the simulator's ground truth for all {len(checked)} "
        "generations[/green]"
    )
    return bool(checked) or bool(earlier)
