"""The month's daily spend by endpoint as a stacked bar chart (PNG, matplotlib)."""

from __future__ import annotations

import io
from datetime import date, timedelta

import pandas as pd
from matplotlib.figure import Figure

from renderqueue_pipeline.reports.months import next_month


def daily_spend_chart(daily: pd.DataFrame, month: date) -> bytes:
    """PNG bytes: one bar per UTC day of the month, stacked by endpoint, in dollars."""
    days = [month + timedelta(days=i) for i in range((next_month(month) - month).days)]
    figure = Figure(figsize=(11, 5.5), dpi=100)
    axes = figure.subplots()
    bottom = pd.Series(0.0, index=days)
    if not daily.empty:
        dollars = daily.assign(usd=daily["cost_micros"].astype("int64") / 1_000_000)
        table = dollars.pivot_table(
            index="day", columns="endpoint", values="usd", aggfunc="sum", fill_value=0.0
        ).reindex(days, fill_value=0.0)
        order = table.sum().sort_values(ascending=False).index
        for endpoint in order:
            # matplotlib's stubs say float; its date converter takes the dates (as it does here)
            axes.bar(days, table[endpoint], bottom=bottom, label=endpoint, width=0.8)  # pyright: ignore[reportArgumentType]
            bottom = bottom + table[endpoint]
        axes.legend(fontsize=7, loc="upper left", frameon=False)
    total = float(bottom.sum())
    axes.set_title(f"Daily spend by endpoint, {month:%B %Y} (UTC days): ${total:,.2f}")
    axes.set_ylabel("USD (completed generations)")
    # dates, as for bar() above
    axes.set_xlim(days[0] - timedelta(days=1), days[-1] + timedelta(days=1))  # pyright: ignore[reportArgumentType]
    axes.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
