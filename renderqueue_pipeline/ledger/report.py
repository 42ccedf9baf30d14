"""A readable summary of the ledger for the terminal (`renderqueue db status`, the demo)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.money import dollars


def ledger_status(conn: LedgerConnection) -> dict[str, list[dict]]:
    """Generations by status, spend by endpoint, and events still waiting for their row."""
    return {
        "by_status": conn.execute(q("status_counts")).fetchall(),
        "by_endpoint": conn.execute(q("spend_by_endpoint")).fetchall(),
        "waiting": conn.execute(q("waiting_event_count")).fetchall(),
    }


def print_ledger_status(url: str | None = None, console: Console | None = None) -> None:
    """Print the ledger summary as two tables."""
    console = console or Console()
    with connect(url) as conn:
        status = ledger_status(conn)
    by_status = Table(title="generations by status")
    for column in ("status", "generations", "cost"):
        by_status.add_column(column, justify="right" if column != "status" else "left")
    for row in status["by_status"]:
        by_status.add_row(row["status"], str(row["generations"]), dollars(row["cost_micros"]))
    by_endpoint = Table(title="spend by endpoint")
    for column in ("endpoint", "generations", "cost"):
        by_endpoint.add_column(column, justify="right" if column != "endpoint" else "left")
    for row in status["by_endpoint"]:
        by_endpoint.add_row(
            escape(str(row["endpoint"])), str(row["generations"]), dollars(row["cost_micros"])
        )
    console.print(by_status)
    console.print(by_endpoint)
    waiting = status["waiting"][0]
    console.print(
        f"events waiting for their row: {waiting['waiting']} "
        f"(expired: {waiting['expired']}, failing to apply: {waiting['failing']}; "
        "see `renderqueue events waiting`)"
    )
