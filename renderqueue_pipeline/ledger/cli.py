"""`renderqueue events ...`: the event inbox, seen from the terminal."""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.ledger.core import waiting_events


@click.group()
def events() -> None:
    """Events fal sent (webhooks) or the reconciler saw, stored in generation_events."""


@events.command("waiting")
@click.option("--limit", default=100, show_default=True, help="Show at most this many.")
def events_waiting(limit: int) -> None:
    """List events not applied yet, oldest first, and why each waits."""

    with connect() as conn:
        rows = waiting_events(conn, limit)
    console = Console()
    if not rows:
        console.print("no events waiting")
        return
    table = Table(title=f"events waiting (oldest {len(rows)})")  # cells are data: escaped
    for column in ("id", "request_id", "kind", "source", "received", "why"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["id"]),
            escape(str(row["request_id"])),
            escape(str(row["kind"])),
            escape(str(row["source"])),
            row["received_at"].isoformat(timespec="seconds"),
            escape(_why(row)),
        )
    console.print(table)


def _why(row: dict) -> str:
    """One line saying why an event is not applied."""
    if row["apply_error"]:
        return f"cannot be applied: {row['apply_error']}"
    if row["expired_at"] is not None:
        return (
            f"expired {row['expired_at'].isoformat(timespec='seconds')}: no generation row "
            "(another fal account, or a submit whose outcome is unknown)"
        )
    if row["has_row"]:
        return "its row exists: applied by the next reconcile"
    return "no generation row yet"
