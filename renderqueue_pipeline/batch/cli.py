"""`renderqueue batch ...`, `renderqueue budget ...` and `renderqueue submit`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from renderqueue_pipeline.alerts import alert_arguments, evaluate_budget_alerts, set_alert_percents
from renderqueue_pipeline.batch import (
    BatchOptions,
    SubmissionInProgress,
    SubmitOptions,
    batch_report,
    budget_overview,
    cancel_batch,
    parse_usd,
    set_budget,
    submit_batch_file,
    submit_prompt,
)
from renderqueue_pipeline.batch.budget import default_limit_from
from renderqueue_pipeline.batch.report import recent_batches
from renderqueue_pipeline.batch.rows import parse_user_id
from renderqueue_pipeline.db import one_row
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.db.server import database_url
from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.fal_gateway import FalGateway
from renderqueue_pipeline.fal_platform import FalPlatform
from renderqueue_pipeline.money import usd
from renderqueue_pipeline.months import parse_month
from renderqueue_pipeline.settings import get_settings, parse_alert_percents


def _require_fal() -> None:
    """fal calls need FAL_KEY (fal's, or the local simulator's from its export lines)."""

    if get_settings().fal_key is None:
        raise RenderqueueError(
            "FAL_KEY is not set: export your fal key, or start the local simulator with "
            "`renderqueue simulator serve` and eval the export lines it prints"
        )


def _file_url(file: str) -> str:
    """A local path as `file://` + the path itself: `Path.as_uri()` percent-encodes spaces
    and brackets, and fsspec does not decode them ("no such file")."""
    return file if "://" in file else "file://" + str(Path(file).expanduser().resolve())


def _ledger_url() -> str:

    url = database_url()
    migrate(url)
    return url


def _print_report(report) -> None:

    click.echo(f"batch {report.batch_id}: {report.source}")
    click.echo(f"  status      {report.status}" + (f" ({report.error})" if report.error else ""))
    for name in ("read", "submitted", "rejected", "over_budget", "unknown", "pending"):
        if name != "pending" or report.counts[name]:
            click.echo(f"  {name.replace('_', ' '):<11} {report.counts[name]:,}")
    click.echo(f"  estimated   {usd(report.submitted_estimate_micros)} (submitted rows)")
    if report.generations:
        states = ", ".join(f"{n:,} {s}" for s, n in sorted(report.generations.items()))
        click.echo(f"  at fal      {states}")
    if report.rejections:
        shown = len(report.rejections)
        total = report.counts["rejected"] + report.counts["over_budget"]
        click.echo(f"\nrejected rows (first {shown} of {total:,}):")
        click.echo(f"  {'line':>6}  {'field':<14} reason")
        for r in report.rejections:
            click.echo(f"  {r['line_no']:>6}  {r['field']:<14} {r['reason']}")
    if report.unknown:
        click.echo(
            f"\nunknown outcomes (fal may or may not have these; resubmit with "
            f"--resubmit-unknown), first {len(report.unknown)} of {report.counts['unknown']:,}:"
        )
        for r in report.unknown:
            click.echo(f"  line {r['line_no']:>6}  user {r['user_id']}  {r['endpoint']}")


@click.group()
def batch() -> None:
    """Prompt files submitted as batches: submit, show, cancel, list."""


@batch.command("submit")
@click.argument("file")
@click.option("--user-id", type=int, help="user_id for rows without one.")
@click.option("--endpoint", help="fal endpoint id for rows without one.")
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="KEY=VALUE",
    help="A model input for rows that do not set it (repeatable).",
)
@click.option("--max-cost-usd", help="Cap on the batch's estimated cost, in USD.")
@click.option(
    "--concurrency", type=int, default=16, show_default=True, help="Requests in flight to fal."
)
@click.option(
    "--priority",
    type=click.Choice(["low", "normal"]),
    default="low",
    show_default=True,
    help="fal queue priority of the batch's requests: low lets a product's submits (normal) "
    "start first under the account's concurrency cap.",
)
@click.option(
    "--resubmit-unknown",
    is_flag=True,
    help="Resend unknown items after a crash, only those fal's request list shows it never "
    "received (the others are adopted); needs the Platform API (FAL_ADMIN_KEY).",
)
def batch_submit(
    file: str,
    user_id: int | None,
    endpoint: str | None,
    inputs: tuple[str, ...],
    max_cost_usd: str | None,
    concurrency: int,
    priority: str,
    resubmit_unknown: bool,
) -> None:
    """Submit FILE (a path or any fsspec URL: CSV, JSONL, Parquet) as one batch.

    Prints the batch id and the counts; exits 1 if nothing could be submitted.
    """

    options = BatchOptions(
        default_user_id=user_id,
        default_endpoint=endpoint,
        default_inputs=_key_values(inputs),
        max_cost_micros=None if max_cost_usd is None else parse_usd(max_cost_usd, "--max-cost-usd"),
        concurrency=concurrency,
        priority="normal" if priority == "normal" else "low",
        resubmit_unknown=resubmit_unknown,
    ).checked()
    _require_fal()
    settings = get_settings()
    result = submit_batch_file(
        _file_url(file),
        options,
        submit_options=SubmitOptions.from_settings(settings),
        gateway_factory=lambda n: FalGateway.from_settings(settings, max_concurrency=n),
        platform_factory=lambda: FalPlatform.from_settings(settings),
        ledger_url=_ledger_url(),
        log=lambda line: click.echo(line, err=True),
    )
    _print_report(result.report)
    if result.duplicate:
        click.echo(f"nothing submitted: this content is batch {result.batch_id}", err=True)
        sys.exit(1)
    if result.report.counts["submitted"] == 0:
        click.echo("nothing could be submitted", err=True)
        sys.exit(1)


@batch.command("show")
@click.argument("batch_id", type=int)
def batch_show(batch_id: int) -> None:
    """Counts, the first 20 rejected rows and the unknown outcomes of a batch."""

    with connect(_ledger_url()) as conn:
        _print_report(batch_report(conn, batch_id))


@batch.command("list")
@click.option("--limit", type=int, default=20, show_default=True)
def batch_list(limit: int) -> None:
    """The most recent batches."""

    with connect(_ledger_url()) as conn:
        rows = recent_batches(conn, limit)
    if not rows:
        click.echo("no batches yet")
    for r in rows:
        click.echo(
            f"{r['id']:>6}  {r['status']:<8} {r['created_at']:%Y-%m-%d %H:%M}  "
            f"{r['rows']:>7,} rows  {r['submitted']:>7,} submitted  {r['rejected']:>6,} rejected  "
            f"{r['unknown']:>4,} unknown  {r['source']}"
        )


@batch.command("cancel")
@click.argument("batch_id", type=int)
def batch_cancel(batch_id: int) -> None:
    """Stop BATCH_ID and cancel its queued and running requests at fal."""

    _require_fal()
    settings = get_settings()
    result = cancel_batch(
        batch_id,
        ledger_url=_ledger_url(),
        log=lambda line: click.echo(line, err=True),
        gateway_factory=lambda n: FalGateway.from_settings(settings, max_concurrency=n),
    )
    click.echo(result.summary())
    for error in result.errors:
        click.echo(f"  line {error['line_no']} {error['request_id']}: {error['error']}", err=True)


def _key_values(pairs: tuple[str, ...]) -> dict[str, str]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--input")
        values[key.strip().lower()] = value
    return values


@click.group()
def budget() -> None:
    """Per-user monthly budgets (USD, UTC months)."""


@budget.command("set")
@click.option("--user-id", type=int, required=True)
@click.option("--usd", "amount", help="The month's budget in USD.")
@click.option("--month", help="YYYY-MM (default: the current UTC month).")
@click.option(
    "--alerts",
    help="This user-month's alert thresholds, percents of the budget (e.g. 50,90); "
    "'default' for RENDERQUEUE_BUDGET_ALERT_PERCENTS.",
)
def budget_set(user_id: int, amount: str | None, month: str | None, alerts: str | None) -> None:
    """Set a user's budget for a month, and/or its alert thresholds."""

    try:
        parse_user_id(user_id)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--user-id") from None
    if amount is None and alerts is None:
        raise click.UsageError("give --usd, --alerts or both")
    percents: tuple[int, ...] | None = None
    if alerts is not None and alerts.strip().lower() != "default":
        try:
            percents = parse_alert_percents(alerts)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--alerts") from None
    micros = None if amount is None else parse_usd(amount, "--usd")
    with connect(_ledger_url()) as conn:
        # one month for both (the ledger clock's, rq_now, unless --month says)
        target = (
            parse_month(month)
            if month is not None
            else one_row(conn.execute(q("alert_clock")))["month"]
        )
        if micros is not None:
            row = set_budget(conn, user_id, micros, target)
            click.echo(
                f"user {row['user_id']}: {usd(row['limit_micros'])} for {row['month']:%Y-%m}"
            )
        if alerts is not None:
            row = set_alert_percents(conn, user_id, target, percents)
            if row is None:
                raise RenderqueueError(
                    f"user {user_id} has no budget for {target:%Y-%m}: "
                    "set one with --usd first (alerts are stored with the budget)"
                )
            shown = ",".join(map(str, row["alert_percents"] or [])) or "default"
            click.echo(f"user {row['user_id']}: alerts at {shown} % for {row['month']:%Y-%m}")


@budget.command("alerts")
def budget_alerts() -> None:
    """Post this month's newly crossed budget thresholds (and due retries); print them.

    The same function as the Dagster sensor budget_alert_sensor: each threshold is sent
    once per user and month, whichever of them runs.
    """

    arguments = alert_arguments(get_settings())
    with connect(_ledger_url()) as conn:
        run = evaluate_budget_alerts(conn, **arguments)
    for outcome in run.sent:
        click.echo(f"sent: {outcome.text}")
    for outcome in run.failed:
        click.echo(
            f"NOT delivered (attempts {outcome.attempts}, next try "
            f"{outcome.next_attempt_at:%Y-%m-%d %H:%M:%S} UTC): {outcome.error}: {outcome.text}"
        )
    click.echo(run.summary())


@budget.command("show")
@click.option("--user-id", type=int, help="One user (default: every user with a budget or spend).")
@click.option("--month", help="YYYY-MM (default: the current UTC month).")
def budget_show(user_id: int | None, month: str | None) -> None:
    """Budget, spent, in flight and remaining per user for a month."""

    with connect(_ledger_url()) as conn:
        target = None if month is None else parse_month(month)
        rows = budget_overview(conn, user_id, target, default_limit_from(get_settings()))
    if not rows:
        click.echo("no budgets or spend this month")
        return
    click.echo(
        f"{'user':>8}  {'month':<7}  {'budget':>14}  {'spent':>14}  {'in flight':>14}  "
        f"{'remaining':>14}"
    )
    for f in rows:
        budget_text = usd(f.limit_micros) + (" (default)" if f.limit_source == "default" else "")
        remaining = "-" if f.remaining_micros is None else usd(f.remaining_micros)
        click.echo(
            f"{f.user_id:>8}  {f.month:%Y-%m}  {budget_text:>14}  {usd(f.actual_micros):>14}  "
            f"{usd(f.in_flight_micros):>14}  {remaining:>14}"
        )


#: `renderqueue submit`: another call with the same idempotency key holds it (EX_TEMPFAIL)
SUBMISSION_IN_PROGRESS_EXIT = 75


@click.command(
    "submit",
    epilog=(
        f"Exit codes: 0 printed the request id; {SUBMISSION_IN_PROGRESS_EXIT} the "
        "idempotency key is being submitted by another call with no outcome yet, or its "
        "sender stopped before fal answered (nothing was sent by this call; retry later, "
        "the reconciler settles a stopped one); 2 any other error (bad input, over budget, "
        "fal refused it, outcome unknown)."
    ),
)
@click.option("--user-id", type=int, required=True)
@click.option("--endpoint", required=True, help="fal endpoint id.")
@click.option("--prompt", required=True)
@click.option("--input", "inputs", multiple=True, metavar="KEY=VALUE", help="A model input.")
@click.option("--idempotency-key", help="The same key never submits twice.")
def submit(
    user_id: int, endpoint: str, prompt: str, inputs: tuple[str, ...], idempotency_key: str | None
) -> None:
    """Submit one generation (budget checked, ledger first) and print its request id."""

    values = _key_values(inputs)
    _require_fal()
    try:
        request_id = submit_prompt(
            user_id,
            endpoint,
            prompt,
            values,
            idempotency_key=idempotency_key,
            ledger_url=_ledger_url(),
        )
    except SubmissionInProgress as exc:
        click.echo(f"renderqueue: {exc}", err=True)
        sys.exit(SUBMISSION_IN_PROGRESS_EXIT)
    click.echo(request_id)
