"""`renderqueue report`: a month's spend by user, endpoint or batch, from the ledger."""

from __future__ import annotations

import csv
import json
import sys
from decimal import Decimal

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.money import dollars
from renderqueue_pipeline.reports.forecast_cli import print_forecast
from renderqueue_pipeline.reports.ledger_view import columns_for, month_from_ledger
from renderqueue_pipeline.reports.months import month_label, parse_month

# The terminal view: two tables (counts, then money) of the columns a reader scans, with
# short headers, so that each fits a terminal; CSV and JSON carry every column by name.
KEY_HEADERS = {"user_id": "user", "endpoint": "endpoint", "batch_id": "batch", "source": "source"}
COUNT_HEADERS = {
    "generations": "gens",
    "completed": "done",
    "failed": "failed",
    "canceled": "canceled",
    "open": "open",
    "billed_seconds": "seconds",
    "open_estimate_micros": "open est.",
}
MONEY_HEADERS = {
    "cost_micros": "cost",
    "computed_micros": "ours",
    "fal_billed_micros": "fal billed",
    "billed_difference_micros": "fal − ours",
}


def _plain(value):
    if isinstance(value, Decimal):
        return str(value)
    return value


@click.command("report")
@click.option("--month", "month_text", required=True, help="UTC month, YYYY-MM.")
@click.option(
    "--by", type=click.Choice(["user", "endpoint", "batch"]), default="endpoint", show_default=True
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "focus"]),
    default="table",
    show_default=True,
    help="focus: one FinOps FOCUS cost row per completed generation, as CSV (--by is ignored).",
)
@click.option(
    "--forecast",
    is_flag=True,
    help="The month-end forecast by user (with budgets) and endpoint, as of now.",
)
def report(month_text: str, by: str, fmt: str, forecast: bool) -> None:
    """Spend for one UTC month, straight from the ledger (no materialization needed).

    Same figures as the report tables: counts by status, billed seconds and cost of
    completed generations (micro-dollars, and cents rounded once), estimates of open ones.
    """

    month = parse_month(month_text)
    if forecast:
        if fmt == "focus":
            raise click.UsageError("--forecast prints table, csv or json, not focus")
        print_forecast(month, fmt)
        return
    if fmt == "focus":  # the same CSV as the month's focus.csv report file
        # focus loads pandas and pyarrow: only --format focus pays for them
        from renderqueue_pipeline.reports.focus import focus_csv, focus_records  # noqa: PLC0415

        with connect() as conn:
            sys.stdout.write(focus_csv(focus_records(conn, month)).decode())
        return
    with connect() as conn:
        rows = month_from_ledger(conn, month, by)
    columns = columns_for(by)
    if fmt == "json":
        click.echo(json.dumps([{c: _plain(r[c]) for c in columns} for r in rows], indent=2))
        return
    if fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: _plain(r[c]) for c in columns} for r in rows)
        return

    total = sum(int(r["cost_micros"]) for r in rows)
    console = Console()
    title = f"spend {month_label(month)} by {by} (UTC): {dollars(total)}"
    for heading, group in (
        (title, COUNT_HEADERS),
        (
            "money: cost = the ledger's (fal's figure once billed), ours = what the ledger "
            "priced, fal − ours = for the generations fal billed",
            MONEY_HEADERS,
        ),
    ):
        table = Table(title=escape(heading))
        shown = [c for c in columns if c in KEY_HEADERS or c in group]
        for column in shown:
            text = column in ("endpoint", "source")
            table.add_column(
                KEY_HEADERS.get(column) or group[column],
                justify="left" if text else "right",
                overflow="fold",
                no_wrap=not text,
            )
        for r in rows:
            table.add_row(
                *[
                    "-"
                    if r[c] is None
                    else dollars(r[c])
                    if c.endswith("_micros")
                    else escape(str(r[c]))  # a source or endpoint is data, not markup
                    for c in shown
                ]
            )
        console.print(table)
    console.print("every column, exact: --format csv or --format json")
    if not rows:
        click.echo(f"no generations in {month_label(month)}")
