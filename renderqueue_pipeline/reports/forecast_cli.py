"""`renderqueue report --month M --forecast`: the forecast as a table, CSV or JSON."""

from __future__ import annotations

import csv
import json
import sys
from datetime import date

import click
from rich.console import Console
from rich.table import Table

from renderqueue_pipeline.batch.budget import default_limit_from
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.money import dollars
from renderqueue_pipeline.reports.forecast import Forecast, ForecastRow, forecast_month
from renderqueue_pipeline.settings import get_settings

COLUMNS = [
    "by",
    "key",
    "month_to_date_micros",
    "last_7_days_micros",
    "daily_rate_micros",
    "projected_rest_micros",
    "forecast_micros",
    "in_flight_micros",
    "budget_micros",
    "over_budget",
]


def _record(by: str, row: ForecastRow) -> dict:
    record = {"by": by, "key": row.key}
    for column in COLUMNS[2:]:
        record[column] = getattr(row, column)
    if by == "endpoint":
        record["budget_micros"] = record["over_budget"] = None
    return record


def records(forecast: Forecast) -> list[dict]:
    """Every user, then every endpoint, each with every column."""
    return [_record("user", r) for r in forecast.by_user] + [
        _record("endpoint", r) for r in forecast.by_endpoint
    ]


def print_forecast(month: date, fmt: str) -> None:
    """Compute the month's forecast as of the ledger's clock and print it."""

    with connect() as conn:
        forecast = forecast_month(
            conn, month, default_budget_micros=default_limit_from(get_settings())
        )
    if fmt == "json":
        click.echo(json.dumps(records(forecast), indent=2))
        return
    if fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records(forecast))
        return

    console = Console()
    title = (
        f"forecast {forecast.month:%Y-%m} as of {forecast.as_of:%Y-%m-%d %H:%M} UTC, "
        f"{forecast.days_left:.2f} day(s) left: {dollars(forecast.forecast_micros)}"
    )
    for by, rows in (("user", forecast.by_user), ("endpoint", forecast.by_endpoint)):
        table = Table(title=title if by == "user" else None)
        table.add_column(by, overflow="fold")
        for heading in ("to date", "7-day rate/day", "forecast", "in flight"):
            table.add_column(heading, justify="right", no_wrap=True)
        if by == "user":
            table.add_column("budget", justify="right", no_wrap=True)
            table.add_column("over", justify="center")
        for r in rows:
            cells = [
                str(r.key),
                dollars(r.month_to_date_micros),
                dollars(r.daily_rate_micros),
                dollars(r.forecast_micros),
                dollars(r.in_flight_micros),
            ]
            if by == "user":
                budget = "-" if r.budget_micros is None else dollars(r.budget_micros)
                cells += [budget, "OVER" if r.over_budget else ""]
            table.add_row(*cells)
        console.print(table)
    over = forecast.over_budget
    if over:
        click.echo("forecast over budget: " + ", ".join(f"user {r.key}" for r in over))
    if not forecast.by_user:
        click.echo(f"no spend or budgets in {forecast.month:%Y-%m}")
