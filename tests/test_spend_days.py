"""fal's bill against the ledger across days and midnights: a month's figures do not depend
on how it is split into days, a bill stamped before our row is still matched, and every
nano-dollar is rounded once per request (docs/spend.md, "Rounding")."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from report_helpers import KLING, add_generation, utc

from renderqueue_pipeline.spend import apply_billed, check_billing, summarize

SEPTEMBER = (utc(2026, 9, 1), utc(2026, 10, 1))
NOW = utc(2026, 11, 15)  # every grace period long over
DAY = dt.timedelta(days=1)


@pytest.fixture
def billing(conn: psycopg.Connection) -> Iterator[None]:
    """The spend tables are not emptied by the shared fixture: emptied here."""
    yield
    conn.rollback()
    conn.execute("truncate fal_billing_events, billing_reconciliation, billing_reconciliation_days")
    conn.commit()


def bill(conn: psycopg.Connection, request_id: str, billed_at: dt.datetime, nanos: int) -> None:
    conn.execute(
        "insert into fal_billing_events (request_id, endpoint, billed_at, output_units,"
        " unit_price, cost_nano_usd) values (%s, %s, %s, 5, 0.14, %s)",
        (request_id, KLING, billed_at, nanos),
    )


def completed(conn: psycopg.Connection, request_id: str, created_at: dt.datetime, micros: int):
    return add_generation(
        conn,
        created_at=created_at,
        status="completed",
        seconds=5,
        cost_micros=micros,
        request_id=request_id,
    )


def outcome(conn: psycopg.Connection, request_id: str) -> list[tuple]:
    return [
        (r["day"], r["outcome"], r["our_micros"], r["fal_micros"])
        for r in conn.execute(
            "select day, outcome, our_micros, fal_micros from billing_reconciliation"
            " where request_id = %s order by day",
            (request_id,),
        )
    ]


def reconcile_days(conn: psycopg.Connection, first: dt.datetime, last: dt.datetime) -> None:
    day = first
    while day < last:
        check_billing(conn, day, day + DAY, now=NOW)
        day += DAY


def test_a_bill_stamped_before_our_row_across_midnight_is_matched(
    conn: psycopg.Connection, billing: None
) -> None:
    # the webhook-before-row case: fal finished at 23:59:59.97, our row written at 00:00:00.02
    completed(conn, "midnight", utc(2026, 9, 11, 0, 0, 0, 20_000), 700_000)
    bill(conn, "midnight", utc(2026, 9, 10, 23, 59, 59, 970_000), 700_000_000)
    # a bill at 23:59 for a generation at 00:01 (fal's clock and ours disagree)
    completed(conn, "skewed", utc(2026, 9, 21, 0, 1), 700_000)
    bill(conn, "skewed", utc(2026, 9, 20, 23, 59), 700_500_000)
    conn.commit()
    reconcile_days(conn, utc(2026, 9, 10), utc(2026, 9, 22))
    assert outcome(conn, "midnight") == []  # matched: counted, not a finding
    assert outcome(conn, "skewed") == [(dt.date(2026, 9, 21), "amount_differs", 700_000, 700_500)]
    month = summarize(conn, *SEPTEMBER)
    assert (month.count("matched"), month.count("amount_differs")) == (1, 1)
    assert month.count("not_billed") == month.count("unknown_to_ledger") == 0
    assert month.fal_micros == 700_000 + 700_500
    # and fal's figure becomes the cost of each, day by day too
    assert apply_billed(conn, utc(2026, 9, 11), utc(2026, 9, 12)) == 1
    assert apply_billed(conn, utc(2026, 9, 21), utc(2026, 9, 22)) == 1
    rows = conn.execute(
        "select request_id, cost_micros, cost_basis from generations order by request_id"
    ).fetchall()
    assert [(r["request_id"], r["cost_micros"], r["cost_basis"]) for r in rows] == [
        ("midnight", 700_000, "billed"),
        ("skewed", 700_500, "billed"),
    ]


def test_an_unknown_request_billed_on_two_days_counts_each_event_once(
    conn: psycopg.Connection, billing: None
) -> None:
    bill(conn, "stranger", utc(2026, 9, 10, 8), 700_000_000)
    bill(conn, "stranger", utc(2026, 9, 12, 8), 700_000_000)
    conn.commit()
    reconcile_days(conn, *SEPTEMBER)
    assert outcome(conn, "stranger") == [
        (dt.date(2026, 9, 10), "unknown_to_ledger", None, 700_000),
        (dt.date(2026, 9, 12), "unknown_to_ledger", None, 700_000),
    ]
    assert summarize(conn, *SEPTEMBER).fal_micros == 1_400_000
    check_billing(conn, *SEPTEMBER, now=NOW)  # the month in one range: the same
    assert summarize(conn, *SEPTEMBER).fal_micros == 1_400_000
    assert len(outcome(conn, "stranger")) == 2


def test_nano_dollars_are_summed_per_request_then_rounded_once(
    conn: psycopg.Connection, billing: None
) -> None:
    completed(conn, "half-up", utc(2026, 9, 3, 10), 1_235)
    bill(conn, "half-up", utc(2026, 9, 3, 10, 5), 1_234_500)  # 1,234.5 micros -> 1,235
    completed(conn, "two-halves", utc(2026, 9, 4, 10), 1)
    bill(conn, "two-halves", utc(2026, 9, 4, 10, 5), 500)  # each 0.5 micros: 1 in all,
    bill(conn, "two-halves", utc(2026, 9, 4, 10, 6), 500)  # never 1 + 1
    completed(conn, "one-below", utc(2026, 9, 5, 10), 1_234)  # 1 micro-dollar off: matched
    bill(conn, "one-below", utc(2026, 9, 5, 10, 5), 1_234_500)
    completed(conn, "two-below", utc(2026, 9, 6, 10), 1_233)  # 2 off: a finding
    bill(conn, "two-below", utc(2026, 9, 6, 10, 5), 1_234_500)
    conn.commit()
    check_billing(conn, *SEPTEMBER, now=NOW)
    month = summarize(conn, *SEPTEMBER)
    assert month.count("matched") == 3
    assert outcome(conn, "two-below") == [(dt.date(2026, 9, 6), "amount_differs", 1_233, 1_235)]
    assert month.fal_micros == 1_235 + 1 + 1_235 + 1_235
    assert month.our_micros == 1_235 + 1 + 1_234 + 1_233
    assert apply_billed(conn, *SEPTEMBER) == 4
    costs = {
        r["request_id"]: r["cost_micros"]
        for r in conn.execute("select request_id, cost_micros from generations")
    }
    assert costs == {"half-up": 1_235, "two-halves": 1, "one-below": 1_235, "two-below": 1_235}


def month_of_edges(conn: psycopg.Connection) -> None:
    """Requests around every day boundary and both month ends, known and unknown."""
    completed(conn, "first-instant", utc(2026, 9, 1), 700_000)
    bill(conn, "first-instant", utc(2026, 8, 31, 23, 59, 59), 700_000_000)  # before the month
    completed(conn, "last-instant", utc(2026, 9, 30, 23, 59, 59, 999_000), 560_000)
    bill(conn, "last-instant", utc(2026, 10, 1, 0, 0, 1), 560_000_000)  # after the month
    completed(conn, "midnight", utc(2026, 9, 11, 0, 0, 0, 20_000), 700_000)
    bill(conn, "midnight", utc(2026, 9, 10, 23, 59, 59, 970_000), 700_000_000)
    completed(conn, "rebilled", utc(2026, 9, 14, 12), 1_000)
    bill(conn, "rebilled", utc(2026, 9, 14, 12, 1), 500)
    bill(conn, "rebilled", utc(2026, 9, 16, 12, 1), 999_500)  # a second event days later
    completed(conn, "never-billed", utc(2026, 9, 20, 5), 420_000)
    add_generation(conn, created_at=utc(2026, 9, 22, 5), status="failed", request_id="failed")
    bill(conn, "failed", utc(2026, 9, 22, 6), 100_000_000)  # billed, failed in the ledger
    bill(conn, "stranger", utc(2026, 9, 10, 8), 700_000_000)
    bill(conn, "stranger", utc(2026, 9, 12, 8), 700_000_000)
    bill(conn, "night-stranger", utc(2026, 9, 30, 23, 59, 59), 1_234_500)
    bill(conn, "night-stranger", utc(2026, 10, 1, 0, 0, 1), 1_234_500)  # October's
    bill(conn, "august-stranger", utc(2026, 8, 31, 23, 0), 500)
    conn.commit()


def totals(conn: psycopg.Connection) -> dict:
    month = summarize(conn, *SEPTEMBER)
    return {
        "outcomes": month.outcomes,
        "fal_micros": month.fal_micros,
        "our_micros": month.our_micros,
        "findings": conn.execute(
            "select day, request_id, outcome, our_micros, fal_micros from billing_reconciliation"
            " where day >= '2026-09-01' and day < '2026-10-01' order by day, request_id"
        ).fetchall(),
    }


@pytest.fixture
def edges(conn: psycopg.Connection, billing: None) -> dict:
    month_of_edges(conn)
    check_billing(conn, *SEPTEMBER, now=NOW)
    whole = totals(conn)
    # the month in one range, worked out by hand: each billing event counted once
    assert whole["fal_micros"] == (
        700_000 + 560_000 + 700_000 + 1_000 + 100_000 + 1_400_000 + 1_235
    )
    return whole


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(cuts=st.sets(st.integers(min_value=1, max_value=29), max_size=29))
def test_a_month_split_into_any_days_has_the_same_figures(
    conn: psycopg.Connection, edges: dict, cuts: set[int]
) -> None:
    conn.execute("truncate billing_reconciliation, billing_reconciliation_days")
    conn.commit()
    bounds = [SEPTEMBER[0], *(SEPTEMBER[0] + n * DAY for n in sorted(cuts)), SEPTEMBER[1]]
    for start, end in itertools.pairwise(bounds):
        check_billing(conn, start, end, now=NOW)
    assert totals(conn) == edges
