"""One figure of the monthly reports = three places (docs/reports.md, "Adding a figure").

The report rows are one table (`spend_report_rows`, filled by one GROUPING SETS statement)
behind the four analyst-facing views, and every piece of Python that names a report
figure reads `renderqueue_pipeline/reports/figures.py`: these tests hold the views, the
files, the checks, the CLI and the metadata to that one list.
"""

from __future__ import annotations

from datetime import date

import psycopg
from report_helpers import KLING, KLING_MICROS_PER_SECOND, add_generation, utc

from renderqueue_pipeline.defs.reports import metadata
from renderqueue_pipeline.reports import checks, figures, ledger_view, storage
from renderqueue_pipeline.reports.figures import (
    BATCH_FIGURES,
    FIGURES,
    REPORT_COLUMNS,
    REPORT_KEYS,
)
from renderqueue_pipeline.reports.spend import refresh_month

MARCH = date(2026, 3, 1)


def _columns(conn: psycopg.Connection, relation: str) -> tuple[str, ...]:
    return tuple(
        r["column_name"]
        for r in conn.execute(
            "select column_name from information_schema.columns "
            "where table_schema = current_schema() and table_name = %s "
            "order by ordinal_position",
            (relation,),
        )
    )


def test_each_report_view_has_exactly_the_columns_the_figure_list_names(
    conn: psycopg.Connection,
) -> None:
    for view, columns in REPORT_COLUMNS.items():
        assert _columns(conn, view) == columns, view
    kinds = {
        r["relname"]: r["relkind"]
        for r in conn.execute(
            "select relname, relkind from pg_class where relname = any(%s)",
            ([*REPORT_COLUMNS, "spend_report_rows"],),
        )
    }
    # one table holds the rows; the four names analysts query are views over it
    assert kinds == {**dict.fromkeys(REPORT_COLUMNS, "v"), "spend_report_rows": "r"}
    assert set(FIGURES) | set(BATCH_FIGURES) <= set(_columns(conn, "spend_report_rows"))


def test_every_report_carries_every_figure_it_is_defined_for() -> None:
    for table, columns in REPORT_COLUMNS.items():
        wanted = {"month", "computed_at", *REPORT_KEYS[table], *FIGURES}
        if table == "spend_monthly_by_batch":
            wanted |= set(BATCH_FIGURES)
        if table == "spend_daily":  # a day has no rate per second of its own
            wanted.discard("micros_per_completed_second")
        assert len(columns) == len(set(columns)), table
        assert set(columns) == wanted, table


def test_the_files_checks_cli_and_metadata_read_the_one_figure_list(
    conn: psycopg.Connection,
) -> None:
    # the consumers hold the list itself, not a copy of it
    assert checks.COMPARED is figures.COMPARED
    assert checks.COMPLETED_SUMS is figures.COMPLETED_SUMS
    assert storage.REPORT_COLUMNS is figures.REPORT_COLUMNS
    assert metadata.STATUS_COUNTS is figures.STATUS_COUNTS
    for by in ("user", "endpoint", "batch"):
        assert ledger_view.columns_for(by) == figures.cli_columns(by)
    # the checks compare every figure that is not derived from others
    assert set(figures.COMPARED) == set(FIGURES) - set(figures.DERIVED)
    # a report file's columns are the list's, in its order
    add_generation(
        conn,
        created_at=utc(2026, 3, 5, 12),
        status="completed",
        user_id=7,
        endpoint=KLING,
        seconds=5,
        cost_micros=5 * KLING_MICROS_PER_SECOND,
    )
    conn.commit()
    report = refresh_month(conn, MARCH, now=utc(2026, 3, 20))
    for table, columns in REPORT_COLUMNS.items():
        frame = storage.read_table(conn, table, MARCH)
        assert tuple(frame.columns) == columns, table
        assert len(frame) == 1, table
        rows = frame.to_dict("records")
        shown = metadata.table_metadata(report, table, rows)
        assert {c: shown[c] for c in figures.STATUS_COUNTS} == {
            "completed": 1,
            "failed": 0,
            "canceled": 0,
            "open": 0,
        }
