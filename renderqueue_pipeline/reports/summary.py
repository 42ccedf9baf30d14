"""Figures for people: dollars from micro-dollars, top-N markdown tables."""

from __future__ import annotations

from decimal import Decimal

from renderqueue_pipeline.ledger.report import dollars

__all__ = ["dollars", "micros_to_usd", "top_table"]


def micros_to_usd(micros: int) -> float:
    """For numeric metadata only (plots, comparisons); exact figures stay in micro-dollars."""
    return float(Decimal(int(micros)) / Decimal(1_000_000))


def top_table(rows: list[dict], key: str, n: int = 10) -> str:
    """The `n` rows with the highest cost as a markdown table."""
    top = sorted(rows, key=lambda r: (-int(r["cost_micros"]), str(r[key])))[:n]
    lines = [
        f"| {key} | generations | completed | failed | canceled | open | cost |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in top:
        label = r[key] if r[key] is not None else "(none)"
        lines.append(
            f"| {label} | {r['generations']} | {r['completed']} | {r['failed']} | "
            f"{r['canceled']} | {r['open']} | {dollars(r['cost_micros'])} |"
        )
    return "\n".join(lines)
