"""Figures for people: top-N markdown tables (money formatting: `renderqueue_pipeline.money`)."""

from __future__ import annotations

from renderqueue_pipeline.money import dollars

__all__ = ["top_table"]


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
