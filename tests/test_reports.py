"""Monthly spend reports over a hand-built ledger whose totals are known exactly."""

from __future__ import annotations

from collections import defaultdict
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

import psycopg
import pytest
from report_helpers import (
    KLING,
    KLING_MICROS_PER_SECOND,
    VEO,
    VEO_MICROS_PER_SECOND,
    add_batch,
    add_generation,
    add_item,
    table,
    utc,
)

from renderqueue_pipeline.ledger import LedgerEvent, record_events
from renderqueue_pipeline.reports import spend
from renderqueue_pipeline.reports.checks import (
    completed_generations_are_priced,
    no_archive_failures,
    no_generation_open_too_long,
    report_matches_ledger,
)
from renderqueue_pipeline.reports.months import (
    MonthError,
    finalizes_at,
    month_range,
    parse_month,
)
from renderqueue_pipeline.reports.spend import mark_days_unsettled, refresh_month
from renderqueue_pipeline.spend.billing_check import apply_billed

MARCH = date(2026, 3, 1)
PRICE = {KLING: KLING_MICROS_PER_SECOND, VEO: VEO_MICROS_PER_SECOND}
AFTER_MARCH = utc(2026, 4, 2)  # past the grace period: a finalizing refresh

# (user, endpoint, status, seconds, created_at): cost = seconds x the published price
MARCH_ROWS = [
    (1, KLING, "completed", 5, utc(2026, 3, 1, 0, 0, 0)),  # first instant of March
    (1, KLING, "completed", 10, utc(2026, 3, 31, 23, 59, 59, 999000)),  # last millisecond
    (1, KLING, "completed", 7, utc(2026, 3, 15, 12)),
    (1, KLING, "failed", 5, utc(2026, 3, 10, 8)),
    (1, KLING, "canceled", 5, utc(2026, 3, 11, 9)),
    (2, VEO, "completed", 8, utc(2026, 3, 5, 14)),
    (2, VEO, "in_progress", 8, utc(2026, 3, 31, 20)),
    (3, KLING, "completed", 3, utc(2026, 3, 20, 1)),
    (3, VEO, "submitted", 6, utc(2026, 3, 31, 22)),
]
OUTSIDE_ROWS = [
    (2, VEO, "completed", 8, utc(2026, 2, 28, 23, 59, 59, 999000)),  # February
    (2, VEO, "completed", 8, utc(2026, 4, 1, 0, 0, 0)),  # April
]


def build(conn: psycopg.Connection, rows) -> None:
    for user, endpoint, status, seconds, created in rows:
        add_generation(
            conn,
            created_at=created,
            status=status,
            user_id=user,
            endpoint=endpoint,
            seconds=seconds,
            # failed/canceled rows carry their estimate in: the ledger must zero it
            cost_micros=seconds * PRICE[endpoint],
        )
    conn.commit()


def expected(rows, key: int) -> dict:
    """Report figures computed here from the published prices, independently of SQL."""
    out: dict = defaultdict(
        lambda: dict.fromkeys(
            (
                "generations",
                "completed",
                "failed",
                "canceled",
                "open",
                "cost_micros",
                "open_estimate_micros",
                "billed_seconds",
            ),
            0,
        )
    )
    for row in rows:
        _user, endpoint, status, seconds, _ = row
        figures = out[row[key]]
        figures["generations"] += 1
        if status == "completed":
            figures["completed"] += 1
            figures["cost_micros"] += seconds * PRICE[endpoint]
            figures["billed_seconds"] += seconds
        elif status in ("failed", "canceled"):
            figures[status] += 1
        else:
            figures["open"] += 1
            figures["open_estimate_micros"] += seconds * PRICE[endpoint]
    return dict(out)


def cents(micros: int) -> int:
    return int((Decimal(micros) / 10_000).quantize(Decimal(1), ROUND_HALF_UP))


def figures_of(rows: list[dict], key: str) -> dict:
    names = (
        "generations",
        "completed",
        "failed",
        "canceled",
        "open",
        "cost_micros",
        "open_estimate_micros",
        "billed_seconds",
    )
    return {r[key]: {n: r[n] for n in names} for r in rows}


def test_month_totals_equal_the_hand_built_ledger(conn: psycopg.Connection) -> None:
    build(conn, MARCH_ROWS + OUTSIDE_ROWS)
    conn.execute("set timezone = 'Pacific/Kiritimati'")  # UTC+14: UTC days must still rule
    report = refresh_month(conn, MARCH, now=AFTER_MARCH)
    assert report.state == "final"

    by_user = table(conn, "spend_monthly_by_user", MARCH)
    by_endpoint = table(conn, "spend_monthly_by_endpoint", MARCH)
    assert figures_of(by_user, "user_id") == expected(MARCH_ROWS, 0)
    assert figures_of(by_endpoint, "endpoint") == expected(MARCH_ROWS, 1)
    total = sum(e["cost_micros"] for e in expected(MARCH_ROWS, 0).values())
    assert report.cost_micros == total
    assert report.generations == len(MARCH_ROWS)
    for row in by_endpoint:
        assert row["cost_cents"] == cents(row["cost_micros"])
        assert row["micros_per_completed_second"] == Decimal(PRICE[row["endpoint"]])
    # daily rows: one per UTC day and endpoint, summing to the month
    daily = table(conn, "spend_daily", MARCH)
    assert {(r["day"], r["endpoint"]) for r in daily} == {
        (created.date(), endpoint) for _, endpoint, _, _, created in MARCH_ROWS
    }
    assert sum(r["cost_micros"] for r in daily) == total
    # the neighbours hold exactly the boundary rows
    february = refresh_month(conn, date(2026, 2, 1), now=AFTER_MARCH)
    april = refresh_month(conn, date(2026, 4, 1), now=utc(2026, 5, 2))
    assert (february.generations, february.cost_micros) == (1, 8 * VEO_MICROS_PER_SECOND)
    assert (april.generations, april.cost_micros) == (1, 8 * VEO_MICROS_PER_SECOND)


def test_cents_are_the_micro_dollar_sum_rounded_once(conn: psycopg.Connection) -> None:
    # three half-cent generations: 1.5 cents in all, 2 rounded once; 3 if rounded per row
    for hour in (1, 2, 3):
        add_generation(
            conn,
            created_at=utc(2026, 3, 2, hour),
            status="completed",
            seconds=Decimal("0.035714"),
            cost_micros=5_000,
        )
    conn.commit()
    refresh_month(conn, MARCH, now=AFTER_MARCH)
    (row,) = table(conn, "spend_monthly_by_user", MARCH)
    assert row["cost_micros"] == 15_000
    assert row["cost_cents"] == 2
    per_row = conn.execute("select sum(cost_cents) as c from generations").fetchone()["c"]
    assert per_row == 3


def test_by_batch_shows_source_and_estimate_against_cost(conn: psycopg.Connection) -> None:
    batch = add_batch(conn, "s3://prompts/inbox/march.csv")
    estimate = 5 * KLING_MICROS_PER_SECOND
    for seconds, status in ((5, "completed"), (6, "completed"), (5, "failed")):
        item = add_item(conn, batch, estimate)
        add_generation(
            conn,
            created_at=utc(2026, 3, 3, seconds),
            status=status,
            seconds=seconds,
            cost_micros=seconds * KLING_MICROS_PER_SECOND,
            batch_item_id=item,
        )
    single = add_item(conn, None, estimate)
    add_generation(
        conn,
        created_at=utc(2026, 3, 4),
        status="completed",
        seconds=5,
        cost_micros=5 * KLING_MICROS_PER_SECOND,
        batch_item_id=single,
    )
    conn.commit()
    refresh_month(conn, MARCH, now=AFTER_MARCH)
    rows = {r["batch_id"]: r for r in table(conn, "spend_monthly_by_batch", MARCH)}
    cost = 11 * KLING_MICROS_PER_SECOND
    assert rows[batch]["source"] == "s3://prompts/inbox/march.csv"
    assert (rows[batch]["generations"], rows[batch]["failed"]) == (3, 1)
    assert rows[batch]["cost_micros"] == cost
    assert rows[batch]["submit_estimate_micros"] == 3 * estimate
    assert rows[batch]["cost_minus_estimate_micros"] == cost - 3 * estimate
    assert rows[None]["source"] is None  # submitted one at a time
    assert rows[None]["cost_micros"] == 5 * KLING_MICROS_PER_SECOND


@pytest.fixture
def raised_price(conn: psycopg.Connection):
    """A price rise for Kling from 16 March (prices are not emptied between tests)."""
    new_price = 200_000
    conn.execute(
        "insert into prices (endpoint, micros_per_second, default_seconds, effective_from,"
        " price_version, source) values (%s, %s, 5, '2026-03-16', 'test-raise', 'test')",
        (KLING, new_price),
    )
    conn.commit()
    yield new_price
    conn.rollback()
    conn.execute(
        "delete from generations where price_id in "
        "(select id from prices where price_version = 'test-raise')"
    )
    conn.execute("delete from prices where price_version = 'test-raise'")
    conn.commit()


def test_price_change_mid_month(conn: psycopg.Connection, raised_price: int) -> None:
    """Completions are priced by the ledger at the price in force at created_at (for
    this endpoint: the requested 5 s, as fal's output documents no duration)."""
    new_price = raised_price
    before = add_generation(
        conn,
        created_at=utc(2026, 3, 10),
        status="submitted",
        seconds=5,
        cost_micros=5 * KLING_MICROS_PER_SECOND,
    )
    after = add_generation(
        conn, created_at=utc(2026, 3, 20), status="submitted", seconds=5, cost_micros=5 * new_price
    )
    conn.commit()
    record_events(
        conn,
        [
            LedgerEvent(rid, "completed", {"video": {"url": f"https://v3b.fal.media/{rid}.mp4"}})
            for rid in (before, after)
        ],
    )
    report = refresh_month(conn, MARCH, now=AFTER_MARCH)
    assert report.cost_micros == 5 * KLING_MICROS_PER_SECOND + 5 * new_price
    daily = {r["day"]: r["cost_micros"] for r in table(conn, "spend_daily", MARCH)}
    assert daily == {
        date(2026, 3, 10): 5 * KLING_MICROS_PER_SECOND,
        date(2026, 3, 20): 5 * new_price,
    }


def test_late_completion_moves_the_previous_month_before_finalization(
    conn: psycopg.Connection,
) -> None:
    # Kling's output documents no duration: the ledger bills the requested 7 s
    late = add_generation(
        conn,
        created_at=utc(2026, 3, 31, 23, 50),
        status="in_progress",
        seconds=7,
        cost_micros=7 * KLING_MICROS_PER_SECOND,
    )
    add_generation(
        conn,
        created_at=utc(2026, 3, 12),
        status="completed",
        seconds=4,
        cost_micros=4 * KLING_MICROS_PER_SECOND,
    )
    conn.commit()
    evening = refresh_month(conn, MARCH, now=utc(2026, 3, 31, 23, 55))
    assert evening.state == "open"
    assert (evening.cost_micros, evening.open_estimate_micros) == (
        4 * KLING_MICROS_PER_SECOND,
        7 * KLING_MICROS_PER_SECOND,
    )

    # fal finishes it after midnight UTC: still March's money (created_at decides)
    record_events(
        conn, [LedgerEvent(late, "completed", {"video": {"url": "https://v3b.fal.media/late.mp4"}})]
    )
    night = refresh_month(conn, MARCH, now=utc(2026, 4, 1, 3))
    assert night.state == "open"  # before 06:00 UTC on the 1st: not final yet
    assert night.cost_micros == 11 * KLING_MICROS_PER_SECOND
    assert night.open_estimate_micros == 0

    final = refresh_month(conn, MARCH, now=finalizes_at(MARCH))
    assert final.state == "final"
    assert final.cost_micros == 11 * KLING_MICROS_PER_SECOND
    april = refresh_month(conn, date(2026, 4, 1), now=utc(2026, 4, 1, 7))
    assert april.generations == 0
    state = conn.execute("select * from spend_report_months where month = %s", (MARCH,)).fetchone()
    assert state["state"] == "final"
    assert state["finalized_at"] == finalizes_at(MARCH)


def test_rematerializing_gives_the_same_rows(conn: psycopg.Connection) -> None:
    build(conn, MARCH_ROWS + OUTSIDE_ROWS)
    names = (
        "spend_monthly_by_user",
        "spend_monthly_by_endpoint",
        "spend_monthly_by_batch",
        "spend_daily",
    )
    refresh_month(conn, MARCH, now=AFTER_MARCH)
    first = {n: table(conn, n, MARCH) for n in names}
    refresh_month(conn, MARCH, now=AFTER_MARCH + timedelta(days=3))
    assert {n: table(conn, n, MARCH) for n in names} == first
    # an open month's incremental refresh, then a rebuild, agree with the final figures
    refresh_month(conn, MARCH, now=utc(2026, 3, 31, 23, 59))
    refresh_month(conn, MARCH, now=utc(2026, 3, 31, 23, 59, 30))
    assert {n: table(conn, n, MARCH) for n in names} == first
    refresh_month(conn, MARCH, now=utc(2026, 3, 31, 23, 59, 45), rebuild=True)
    assert {n: table(conn, n, MARCH) for n in names} == first


def test_open_month_reads_only_changed_days(conn: psycopg.Connection) -> None:
    build(conn, MARCH_ROWS[:6])  # completed, failed, canceled: every day settles
    now = utc(2026, 3, 31, 23, 30)
    first = refresh_month(conn, MARCH, now=now)
    assert first.days_recomputed == 31
    second = refresh_month(conn, MARCH, now=now + timedelta(minutes=5))
    assert second.days_recomputed == 1  # today only
    assert second.days_reused == 30
    # reused days were seen unchanged up to this refresh: the next one looks after it only
    marks = conn.execute(
        "select distinct max_generation_id, snapshot_at from spend_rollup_days"
    ).fetchall()
    assert len(marks) == 1
    # a late row for a settled day is a new id: that day is read again
    add_generation(
        conn,
        created_at=utc(2026, 3, 3, 4),
        status="completed",
        seconds=2,
        cost_micros=2 * KLING_MICROS_PER_SECOND,
    )
    conn.commit()
    third = refresh_month(conn, MARCH, now=now + timedelta(minutes=10))
    assert third.days_recomputed == 2
    assert third.cost_micros == first.cost_micros + 2 * KLING_MICROS_PER_SECOND


def test_report_check_fails_on_a_stale_day_and_passes_after_rebuild(
    conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an old row: beyond the ids a refresh looks back over for commits still in flight
    monkeypatch.setattr(spend, "ID_OVERLAP", 0)
    build(conn, MARCH_ROWS[:6])
    now = utc(2026, 3, 31, 23, 30)
    refresh_month(conn, MARCH, now=now)
    # a raw UPDATE outside record_events: no event, no new id; the settled day is reused
    conn.execute(
        "update generations set cost_micros = cost_micros + 1 where created_at = %s",
        (utc(2026, 3, 15, 12),),
    )
    conn.commit()
    refresh_month(conn, MARCH, now=now + timedelta(minutes=5))
    finding = report_matches_ledger(conn, MARCH, "user", margin="0 seconds")
    assert not finding.passed
    assert finding.metadata["difference_micros"] == -1
    assert finding.metadata["keys_differing"] == 1
    assert "| 1 | cost_micros |" in finding.metadata["differences"]
    assert not report_matches_ledger(conn, MARCH, "endpoint", margin="0 seconds").passed
    # ...the writer should have said so: then the next refresh reads the day again
    mark_days_unsettled(conn, [date(2026, 3, 15)])
    conn.commit()
    refresh_month(conn, MARCH, now=now + timedelta(minutes=10))
    assert report_matches_ledger(conn, MARCH, "user", margin="0 seconds").passed
    # and a rebuild always reads everything
    conn.execute(
        "update spend_rollup_daily set cost_micros = cost_micros + 7 where day = %s",
        (date(2026, 3, 5),),
    )
    conn.commit()
    refresh_month(conn, MARCH, now=now + timedelta(minutes=15))
    assert not report_matches_ledger(conn, MARCH, "endpoint", margin="0 seconds").passed
    refresh_month(conn, MARCH, now=now + timedelta(minutes=20), rebuild=True)
    passed = report_matches_ledger(conn, MARCH, "endpoint", margin="0 seconds")
    assert passed.passed, passed.metadata
    assert passed.metadata["difference_micros"] == 0


@pytest.fixture
def reconciliation_days(conn: psycopg.Connection):
    """The spend domain's table (not emptied by the shared fixture): cleaned here."""
    yield
    conn.rollback()
    conn.execute("delete from billing_reconciliation_days")
    conn.commit()


def test_days_rebilled_by_the_spend_reconciliation_are_read_again(
    conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch, reconciliation_days: None
) -> None:
    monkeypatch.setattr(spend, "ID_OVERLAP", 0)  # old rows, far below the newest ids
    build(conn, MARCH_ROWS[:6])
    conn.execute("set timezone = 'America/Los_Angeles'")
    now = utc(2026, 3, 31, 23, 30)
    refresh_month(conn, MARCH, now=now)
    # what the spend domain does when fal's bill for 5 March is in: fal's figure replaces
    # ours on the day's generations, and the day's reconciliation is rewritten
    conn.execute(
        "update generations set cost_micros = cost_micros - 100, cost_basis = 'billed'"
        " where created_at = %s",
        (utc(2026, 3, 5, 14),),
    )
    conn.execute(
        "insert into billing_reconciliation_days (day, outcome, requests, our_micros,"
        " fal_micros) values ('2026-03-05', 'amount_differs', 1, 0, 0)"
    )
    conn.commit()
    again = refresh_month(conn, MARCH, now=now + timedelta(minutes=5))
    assert again.days_recomputed == 2  # today, and the rebilled day
    assert report_matches_ledger(conn, MARCH, "user", margin="0 seconds").passed


def test_report_check_fails_on_keys_changed_after_the_report(conn: psycopg.Connection) -> None:
    build(conn, MARCH_ROWS)
    refresh_month(conn, MARCH, now=AFTER_MARCH)
    assert report_matches_ledger(conn, MARCH, "user").passed
    add_generation(
        conn,
        created_at=utc(2026, 3, 9),
        status="completed",
        user_id=9,
        seconds=5,
        cost_micros=5 * KLING_MICROS_PER_SECOND,
    )
    conn.commit()
    # every key is compared: a row the report has not seen fails the check, named
    finding = report_matches_ledger(conn, MARCH, "user")
    assert not finding.passed
    assert finding.metadata["keys_changed_since_report"] == 1
    assert finding.metadata["changed_since_report"] == ["9"]
    assert finding.metadata["difference_micros"] == -5 * KLING_MICROS_PER_SECOND
    assert finding.metadata["month_changed_since_rebuild"] is True


def month_changes(conn: psycopg.Connection, month: date) -> dict | None:
    return conn.execute(
        "select changes, rebuilt_changes, last_changed_at from spend_report_changes"
        " where month = %s",
        (month,),
    ).fetchone()


@pytest.fixture
def billing_events(conn: psycopg.Connection):
    """The spend domain's table (not emptied by the shared fixture): cleaned here."""
    yield
    conn.rollback()
    conn.execute("delete from fal_billing_events")
    conn.commit()


def test_a_final_month_changed_later_fails_its_check_until_rebuilt(
    conn: psycopg.Connection, billing_events: None
) -> None:
    """The review's case: a final report with one open row; the row later completes and
    fal bills it. The check fails until the month is rebuilt, then equals the ledger."""
    add_generation(
        conn,
        created_at=utc(2026, 3, 12),
        status="completed",
        seconds=5,
        cost_micros=5 * KLING_MICROS_PER_SECOND,
    )
    late = add_generation(
        conn,
        created_at=utc(2026, 3, 31, 23, 50),
        status="in_progress",
        seconds=4,
        cost_micros=4 * KLING_MICROS_PER_SECOND,
    )
    conn.commit()
    final = refresh_month(conn, MARCH, now=finalizes_at(MARCH))
    assert (final.state, final.cost_micros, final.open_estimate_micros) == (
        "final",
        700_000,
        560_000,
    )
    assert report_matches_ledger(conn, MARCH, "user").passed
    before = month_changes(conn, MARCH)

    # the reconciler settles it the next day, and fal's bill is applied the morning after
    record_events(
        conn,
        [LedgerEvent(late, "completed", {"video": {"url": "https://v3b.fal.media/l.mp4"}})],
    )
    conn.execute(
        "insert into fal_billing_events (request_id, endpoint, billed_at, output_units,"
        " unit_price, cost_nano_usd) values (%s, %s, %s, 4, 0.14, 560000000)",
        (late, KLING, utc(2026, 3, 31, 23, 59)),
    )
    conn.commit()
    assert apply_billed(conn, *month_range(MARCH)) == 1
    ledger = conn.execute(
        "select sum(cost_micros) as cost, count(*) filter (where status = 'in_progress')"
        " as open, sum(fal_billed_micros) as billed from generations"
    ).fetchone()
    assert (ledger["cost"], ledger["open"], ledger["billed"]) == (1_260_000, 0, 560_000)

    # each writing transaction marked the closed month changed, in the same transaction
    after = month_changes(conn, MARCH)
    assert after["changes"] >= (before["changes"] if before else 0) + 2
    assert after["changes"] > after["rebuilt_changes"]
    for by in ("user", "endpoint"):
        stale = report_matches_ledger(conn, MARCH, by)
        assert not stale.passed, stale.summary
        assert stale.metadata["month_changed_since_rebuild"] is True
        assert stale.metadata["report_cost_micros"] == 700_000
        assert stale.metadata["ledger_cost_micros"] == 1_260_000
        assert "changed at" in stale.summary
    assert [r["month"] for r in spend.changed_months(conn)] == [MARCH]

    # the rebuild (what the sensor asks for) reads every day and records what it saw
    rebuilt = refresh_month(conn, MARCH, now=utc(2026, 4, 3, 9), rebuild=True)
    assert (rebuilt.state, rebuilt.cost_micros, rebuilt.open_estimate_micros) == (
        "final",
        1_260_000,
        0,
    )
    assert rebuilt.fal_billed_micros == 560_000
    assert rebuilt.last_changed_at == after["last_changed_at"]
    assert rebuilt.finalized_at == finalizes_at(MARCH)  # finalized once, rebuilt since
    for by in ("user", "endpoint"):
        check = report_matches_ledger(conn, MARCH, by)
        assert check.passed, check.metadata
        assert check.metadata["month_changed_since_rebuild"] is False
    assert spend.changed_months(conn) == []
    assert figures_of(table(conn, "spend_monthly_by_user", MARCH), "user_id")[1] == {
        "generations": 2,
        "completed": 2,
        "failed": 0,
        "canceled": 0,
        "open": 0,
        "cost_micros": 1_260_000,
        "open_estimate_micros": 0,
        "billed_seconds": 9,
    }


def test_a_plain_refresh_of_a_changed_final_month_is_a_rebuild(
    conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spend, "ID_OVERLAP", 0)  # the raw UPDATE leaves no new id or event
    build(conn, MARCH_ROWS[:6])
    refresh_month(conn, MARCH, now=finalizes_at(MARCH))
    conn.execute(
        "update generations set cost_micros = cost_micros + 1 where created_at = %s",
        (utc(2026, 3, 15, 12),),
    )
    conn.commit()
    again = refresh_month(conn, MARCH, now=utc(2026, 4, 2))
    assert again.rebuilt
    assert again.days_recomputed == 31
    assert report_matches_ledger(conn, MARCH, "user").passed
    assert spend.changed_months(conn) == []


def test_a_change_after_the_rebuild_snapshot_keeps_the_month_changed(
    conn: psycopg.Connection, ledger_url: str
) -> None:
    build(conn, MARCH_ROWS[:3])
    refresh_month(conn, MARCH, now=finalizes_at(MARCH))
    conn.execute(
        "update generations set error = 'late note' where created_at = %s", (utc(2026, 3, 1),)
    )
    conn.commit()
    seen = month_changes(conn, MARCH)["changes"]
    # a writer commits while the rebuild runs: after its snapshot, before it records
    with psycopg.connect(ledger_url, autocommit=True) as other:
        original = spend._write_tables

        def write_then_change(c, month, computed_at):
            original(c, month, computed_at)
            other.execute(
                "update generations set cost_micros = cost_micros + 3 where created_at = %s",
                (utc(2026, 3, 15, 12),),
            )

        spend._write_tables = write_then_change
        try:
            refresh_month(conn, MARCH, now=utc(2026, 4, 2), rebuild=True)
        finally:
            spend._write_tables = original
    changes = month_changes(conn, MARCH)
    assert changes["rebuilt_changes"] == seen
    assert changes["changes"] == seen + 1
    assert not report_matches_ledger(conn, MARCH, "user").passed
    assert [r["month"] for r in spend.changed_months(conn)] == [MARCH]


def test_a_month_of_ten_billion_dollars_reports_in_bigint_cents(
    conn: psycopg.Connection,
) -> None:
    # 500 generations of $20,000,000 (each within a row's integer cents): $10^10, one user,
    # one endpoint, one batch (null), one day: every report table sums it in one group
    conn.execute(
        """insert into generations (request_id, user_id, endpoint, inputs, status,
                                    cost_micros, cost_basis, billed_seconds, created_at,
                                    finished_at, updated_at)
           select 'big-' || i, 1, %s, '{"prompt": "x"}', 'completed', 20000000000000,
                  'computed', 1000, %s, %s, %s
           from generate_series(1, 500) i""",
        (KLING, utc(2026, 3, 7), utc(2026, 3, 7), utc(2026, 3, 7)),
    )
    conn.commit()
    report = refresh_month(conn, MARCH, now=AFTER_MARCH)
    total = 10**10 * 1_000_000
    assert report.cost_micros == total
    for name in ("spend_monthly_by_user", "spend_monthly_by_endpoint", "spend_monthly_by_batch"):
        (row,) = table(conn, name, MARCH)
        assert (row["cost_micros"], row["cost_cents"]) == (total, 10**12), name
    (day,) = table(conn, "spend_daily", MARCH)
    assert day["cost_cents"] == 10**12
    assert report_matches_ledger(conn, MARCH, "user").passed
    assert report_matches_ledger(conn, MARCH, "endpoint").passed
    assert conn.execute("select rq_micros_to_cents(%s) as c", (total,)).fetchone()["c"] == 10**12


def test_report_check_without_a_report(conn: psycopg.Connection) -> None:
    finding = report_matches_ledger(conn, MARCH, "user")
    assert not finding.passed
    assert "no report for 2026-03" in finding.summary


def test_unpriced_completion_fails_the_price_check(conn: psycopg.Connection) -> None:
    build(conn, MARCH_ROWS)
    refresh_month(conn, MARCH, now=AFTER_MARCH)
    assert completed_generations_are_priced(conn, MARCH).passed
    rid = add_generation(
        conn,
        created_at=utc(2026, 3, 7),
        status="completed",
        endpoint="acme/new-model",
        seconds=5,
        cost_basis="unpriced",
    )
    conn.commit()
    refresh_month(conn, MARCH, now=AFTER_MARCH)
    finding = completed_generations_are_priced(conn, MARCH)
    assert not finding.passed
    assert finding.metadata["unpriced_completed"] == 1
    assert finding.metadata["by_endpoint"] == {"acme/new-model": 1}
    assert finding.metadata["first_unpriced"] == [f"{rid} (acme/new-model, unpriced)"]


def test_open_over_24h_fails_the_open_check(conn: psycopg.Connection) -> None:
    rid = add_generation(
        conn,
        created_at=utc(2026, 3, 30, 9),
        status="submitted",
        seconds=5,
        cost_micros=5 * KLING_MICROS_PER_SECOND,
    )
    conn.commit()
    assert no_generation_open_too_long(conn, MARCH, utc(2026, 3, 31, 8)).passed
    finding = no_generation_open_too_long(conn, MARCH, utc(2026, 3, 31, 10))
    assert not finding.passed
    assert finding.metadata["open_over_24h"] == 1
    assert finding.metadata["oldest_open"] == [f"{rid} (submitted since 2026-03-30 09:00 UTC)"]


def test_archive_failures_fail_the_archive_check(conn: psycopg.Connection) -> None:
    build(conn, MARCH_ROWS)
    assert no_archive_failures(conn, MARCH).passed
    rid = add_generation(
        conn,
        created_at=utc(2026, 3, 8),
        status="completed",
        seconds=5,
        cost_micros=5 * KLING_MICROS_PER_SECOND,
        archive_status="failed",
    )
    conn.execute(
        "update generations set archive_error = 'gone (404)' where request_id = %s", (rid,)
    )
    conn.commit()
    finding = no_archive_failures(conn, MARCH)
    assert not finding.passed
    assert finding.metadata["archive_failures"] == 1
    assert finding.metadata["first_failures"] == [f"{rid} (failed): gone (404)"]


@pytest.mark.parametrize("text", ["2026-13", "March", "2026-3", "2026-03-02", ""])
def test_bad_month_is_one_clear_error(text: str) -> None:
    with pytest.raises(MonthError, match="--month"):
        parse_month(text)


def test_every_writer_marks_a_closed_month_changed_in_its_own_transaction(
    conn: psycopg.Connection,
) -> None:
    item = add_item(conn, add_batch(conn, "late.csv"), 700_000)
    conn.execute("update batch_items set request_id = 'late-item' where id = %s", (item,))
    request = add_generation(
        conn,
        created_at=utc(2026, 3, 9),
        status="completed",
        seconds=5,
        cost_micros=700_000,
        batch_item_id=item,
        request_id="late-item",
    )
    conn.commit()
    base = month_changes(conn, MARCH)["changes"]
    # a raw UPDATE, seen in its own transaction and gone with its rollback
    conn.execute("update generations set error = 'x' where request_id = %s", (request,))
    assert month_changes(conn, MARCH)["changes"] == base + 1
    conn.rollback()
    assert month_changes(conn, MARCH)["changes"] == base
    # a batch item's estimate (the by-batch report reads it), then a DELETE
    conn.execute("update batch_items set estimate_micros = 1 where id = %s", (item,))
    conn.execute("update batch_items set state = state where id = %s", (item,))  # no money
    assert month_changes(conn, MARCH)["changes"] == base + 1
    conn.execute("delete from generations where request_id = %s", (request,))
    conn.commit()
    assert month_changes(conn, MARCH)["changes"] == base + 2
    # the current month (by the ledger's clock) is never recorded: its hot path stays bare
    this_month = conn.execute("select rq_month_of(rq_now()) as m").fetchone()["m"]
    add_generation(
        conn, created_at=conn.execute("select rq_now() as t").fetchone()["t"], status="submitted"
    )
    conn.commit()
    assert month_changes(conn, this_month) is None
    # ...until the clock says it has ended
    conn.execute(
        "select set_config('renderqueue.now', %s, false)",
        (str(utc(this_month.year + this_month.month // 12, this_month.month % 12 + 1, 1)),),
    )
    conn.execute(
        "update generations set error = 'y' where created_at >= %s",
        (utc(this_month.year, this_month.month, 1),),
    )
    assert month_changes(conn, this_month)["changes"] == 1
    conn.rollback()
    conn.execute("select set_config('renderqueue.now', '', false)")
