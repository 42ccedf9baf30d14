"""Report files: Parquet and CSV of each report table and of the FOCUS export, and a chart.

Written under any fsspec URL (RENDERQUEUE_STORAGE_URL: file:// by default, s3:// through
s3fs) at reports/spend/YYYY-MM/. Each file is built in memory (a month's report tables are
small) and written whole, so a reader never sees half a file on object storage.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import LiteralString, cast

import fsspec
import pandas as pd

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.reports.chart import daily_spend_chart
from renderqueue_pipeline.reports.checks import snapshot
from renderqueue_pipeline.reports.figures import REPORT_COLUMNS, REPORT_KEYS, REPORT_TABLES
from renderqueue_pipeline.reports.focus import focus_csv, focus_parquet, focus_records

CHART_NAME = "daily_spend_by_endpoint.png"
FOCUS = "focus"  # the FinOps FOCUS export: one cost row per completed generation


@dataclass(frozen=True)
class WrittenFile:
    table: str
    kind: str  # parquet | csv | chart
    name: str
    url: str
    rows: int
    bytes: int


def month_folder(storage_url: str, month: date) -> str:
    return f"{storage_url.rstrip('/')}/reports/spend/{month:%Y-%m}"


def read_table(conn: LedgerConnection, table: str, month: date) -> pd.DataFrame:
    """One month of a report table as a DataFrame, sorted by its key; the columns are the
    report's (reports/figures.py), in that order."""
    if table not in REPORT_TABLES:
        raise ValueError(f"not a report table: {table}")
    select_list = ", ".join(REPORT_COLUMNS[table])
    order = ", ".join(REPORT_KEYS[table])
    with conn.cursor() as cur:
        # the names come from reports/figures.py, never from input (so LiteralString)
        query = f"select {select_list} from {table} where month = %s order by {order}"  # noqa: S608
        cur.execute(cast(LiteralString, query), (month,))
        columns = [c.name for c in cur.description or ()]  # a select: never None
        return pd.DataFrame(cur.fetchall(), columns=columns)


def for_analysts(frame: pd.DataFrame) -> pd.DataFrame:
    """The table with types an analyst uses directly: no column but text reads as `object`.

    Postgres `numeric` (seconds, micro-dollars per second) arrives as Python `Decimal`,
    which pandas keeps as `object`: those become float64; dates (month, day) become
    datetime64. Integer columns that may be
    null (fal's billed figures before fal bills) become pandas' nullable Int64, so they
    stay integers. `cost_usd` (dollars, 6 places) sits beside the exact `cost_micros`.
    """
    out = frame.copy()
    for column in out.columns:
        values = out[column].dropna()
        if (
            out[column].dtype == object
            and len(values)
            and all(isinstance(v, Decimal) for v in values)
        ):
            out[column] = out[column].astype("float64")
        elif column.endswith(("_micros", "_cents", "generations")) and bool(
            out[column].isna().any()
        ):
            out[column] = out[column].astype("Int64")
        elif (
            out[column].dtype == object and len(values) and all(isinstance(v, date) for v in values)
        ):  # a month or a day: a datetime64 column, not Python dates
            out[column] = pd.to_datetime(out[column])
        elif out[column].dtype == object and not len(values) and column.endswith("_seconds"):
            out[column] = out[column].astype("float64")
    if "cost_micros" in out.columns:
        position = list(out.columns).index("cost_micros") + 1
        out.insert(position, "cost_usd", (out["cost_micros"].astype("float64") / 1e6).round(6))
    return out


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def export_month(conn: LedgerConnection, month: date, storage_url: str) -> list[WrittenFile]:
    """Write the month's four report tables and its FOCUS export (Parquet and CSV each) and
    its chart; list them."""
    with snapshot(conn):  # the tables and the FOCUS rows from one view of the ledger
        frames = {table: read_table(conn, table, month) for table in REPORT_TABLES}
        focus = focus_records(conn, month)
    # a fresh filesystem: credentials and endpoint are read now, not from a cached client
    fs, root = fsspec.core.url_to_fs(month_folder(storage_url, month), skip_instance_cache=True)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    fs.makedirs(root, exist_ok=True)
    written = []

    def put(table: str, kind: str, name: str, data: bytes, rows: int) -> None:
        path = f"{root}/{name}"
        fs.pipe_file(path, data)
        url = f"file://{path}" if protocol in ("file", "local") else f"{protocol}://{path}"
        written.append(WrittenFile(table, kind, name, url, rows, len(data)))

    for table, frame in frames.items():
        typed = for_analysts(frame)
        put(table, "parquet", f"{table}.parquet", _parquet(typed), len(frame))
        put(table, "csv", f"{table}.csv", _csv(typed), len(frame))
    put(FOCUS, "parquet", f"{FOCUS}.parquet", focus_parquet(focus), len(focus))
    put(FOCUS, "csv", f"{FOCUS}.csv", focus_csv(focus), len(focus))
    chart = daily_spend_chart(frames["spend_daily"], month)
    put("spend_daily", "chart", CHART_NAME, chart, len(frames["spend_daily"]))
    return written
