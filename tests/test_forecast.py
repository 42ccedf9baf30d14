"""Month-end forecast on a ledger built for it: every expected figure computed by hand.

April 2026 has 30 days. At 2026-04-11 00:00 UTC, 10 days have passed and 20 are left; the
rate window is [04-04 00:00, 04-11 00:00). Prices: Kling $0.14/s, Veo $0.40/s.

user 1 (budget $10): 04-02 Kling 10 s $1.40 (month, not window), 04-05 Kling 5 s $0.70,
  04-10 23:00 Veo 5 s $2.00, a failed one (costs nothing), an open Veo 8 s ($3.20 estimate).
  to date $4.10, last 7 days $2.70, rest 2.70 * 20/7 = $7.714285714 -> $7.714286,
  forecast $11.814286: over its budget.
user 2 (budget $5): 03-30 Kling 10 s $1.40 (March), 04-07 Kling 1 s $0.14, and 04-11 00:00
  exactly Kling 100 s (not yet: created at `now`). To date $0.14, last 7 days $0.14,
  rest $0.40, forecast $0.54: within.
user 3 (no budget row): 04-08 Veo 10 s $4.00; rest 4.00 * 20/7 = $11.428571, forecast
  $15.428571, over nothing unless a default budget is set.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, timedelta
from urllib.parse import quote

import psycopg
import pytest
from click.testing import CliRunner
from dagster import AssetCheckSeverity, materialize
from report_helpers import (
    KLING,
    KLING_MICROS_PER_SECOND,
    VEO,
    VEO_MICROS_PER_SECOND,
    add_generation,
    utc,
)

from renderqueue_pipeline.batch.budget import set_budget
from renderqueue_pipeline.cli import main
from renderqueue_pipeline.defs.reports.forecast import CHECK, spend_forecast
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.reports.forecast import forecast_month, projected
from renderqueue_pipeline.reports.ledger_view import month_from_ledger
from renderqueue_pipeline.reports.months import ReportInputError

APRIL = date(2026, 4, 1)
NOW = utc(2026, 4, 11)
PRICE = {KLING: KLING_MICROS_PER_SECOND, VEO: VEO_MICROS_PER_SECOND}


@pytest.fixture
def april(conn: psycopg.Connection) -> psycopg.Connection:
    rows = [
        (1, KLING, "completed", 10, utc(2026, 4, 2)),
        (1, KLING, "completed", 5, utc(2026, 4, 5)),
        (1, VEO, "completed", 5, utc(2026, 4, 10, 23)),
        (1, VEO, "failed", 5, utc(2026, 4, 6)),
        (1, VEO, "in_progress", 8, utc(2026, 4, 10, 22)),
        (2, KLING, "completed", 10, utc(2026, 3, 30)),
        (2, KLING, "completed", 1, utc(2026, 4, 7)),
        (2, KLING, "completed", 100, utc(2026, 4, 11)),
        (3, VEO, "completed", 10, utc(2026, 4, 8)),
    ]
    for user, endpoint, status, seconds, created in rows:
        add_generation(
            conn,
            created_at=created,
            status=status,
            user_id=user,
            endpoint=endpoint,
            seconds=seconds,
            cost_micros=0 if status == "failed" else seconds * PRICE[endpoint],
        )
    set_budget(conn, 1, 10_000_000, APRIL)
    set_budget(conn, 2, 5_000_000, APRIL)
    conn.commit()
    return conn


def _by_key(rows) -> dict:
    return {r.key: r for r in rows}


def test_forecast_is_month_to_date_plus_the_last_7_days_rate_for_the_days_left(april) -> None:
    forecast = forecast_month(april, APRIL, now=NOW)
    assert forecast.days_left == 20
    users = _by_key(forecast.by_user)
    assert set(users) == {1, 2, 3}
    one, two, three = users[1], users[2], users[3]
    assert (one.month_to_date_micros, one.last_7_days_micros) == (4_100_000, 2_700_000)
    assert one.in_flight_micros == 3_200_000  # shown, not forecast
    assert one.daily_rate_micros == 385_714
    assert one.forecast_micros == 11_814_286
    assert (one.budget_micros, one.over_budget) == (10_000_000, True)
    assert (two.month_to_date_micros, two.last_7_days_micros) == (140_000, 140_000)
    assert (two.forecast_micros, two.budget_micros, two.over_budget) == (540_000, 5_000_000, False)
    assert (three.forecast_micros, three.budget_micros, three.over_budget) == (
        15_428_571,
        None,
        False,
    )
    assert [r.key for r in forecast.over_budget] == [1]
    endpoints = _by_key(forecast.by_endpoint)
    assert endpoints[KLING].month_to_date_micros == 2_240_000
    assert endpoints[KLING].forecast_micros == 2_240_000 + 2_400_000
    assert endpoints[VEO].month_to_date_micros == 6_000_000
    assert endpoints[VEO].forecast_micros == 6_000_000 + 17_142_857


def test_forecast_early_in_the_month_takes_the_rate_from_the_previous_month(april) -> None:
    # 2026-04-03 12:00: 27.5 days left; the window [03-27 12:00, 04-03 12:00) holds user 2's
    # March $1.40 (rate, not month to date) and user 1's 04-02 $1.40: 1.40 * 27.5/7 = $5.50.
    forecast = forecast_month(april, APRIL, now=utc(2026, 4, 3, 12))
    users = _by_key(forecast.by_user)
    assert forecast.days_left == 27.5
    assert (users[2].month_to_date_micros, users[2].forecast_micros) == (0, 5_500_000)
    assert users[2].over_budget  # $5.50 > $5.00 before any April spend lands
    assert (users[1].month_to_date_micros, users[1].forecast_micros) == (1_400_000, 6_900_000)
    assert not users[1].over_budget


def test_a_closed_month_forecast_is_its_report_figure(april) -> None:
    forecast = forecast_month(april, date(2026, 3, 1), now=NOW)
    assert forecast.days_left == 0
    report = {
        r["user_id"]: r["cost_micros"] for r in month_from_ledger(april, date(2026, 3, 1), "user")
    }
    assert {r.key: r.forecast_micros for r in forecast.by_user} == report == {2: 1_400_000}


def test_users_without_a_budget_row_get_the_default_budget(april) -> None:
    forecast = forecast_month(april, APRIL, now=NOW, default_budget_micros=15_000_000)
    users = _by_key(forecast.by_user)
    assert (users[3].budget_micros, users[3].over_budget) == (15_000_000, True)
    assert users[1].budget_micros == 10_000_000  # the user's own row wins


def test_a_month_that_has_not_begun_is_refused(april) -> None:
    with pytest.raises(ReportInputError, match="2026-05 has not begun"):
        forecast_month(april, date(2026, 5, 1), now=NOW)


def test_forecast_follows_the_ledger_clock(april) -> None:
    april.execute("select set_config('renderqueue.now', '2026-04-11T00:00:00Z', false)")
    forecast = forecast_month(april, None)
    assert forecast.month == APRIL
    assert _by_key(forecast.by_user)[1].forecast_micros == 11_814_286


def test_projection_rounds_half_up_to_a_micro_dollar() -> None:
    assert projected(7, timedelta(days=1)) == 1
    assert projected(7, timedelta(hours=12)) == 1  # 0.5 -> 1
    assert projected(6, timedelta(hours=12)) == 0  # 0.43 -> 0
    assert projected(2_700_000, timedelta(days=20)) == 7_714_286


def _clocked(url: str, now: str) -> str:
    option = quote(f"-c renderqueue.now={now}")
    return f"{url}{'&' if '?' in url else '?'}options={option}"


def test_report_forecast_prints_the_month_end_forecast(
    april, ledger_env: str, settings_env: Callable[..., None]
) -> None:

    settings_env(DATABASE_URL=_clocked(ledger_env, "2026-04-11T00:00:00Z"))
    result = CliRunner().invoke(
        main, ["report", "--month", "2026-04", "--forecast", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    rows = {(r["by"], r["key"]): r for r in json.loads(result.output)}
    assert rows[("user", 1)]["forecast_micros"] == 11_814_286
    assert rows[("user", 1)]["over_budget"] is True
    assert rows[("endpoint", VEO)]["forecast_micros"] == 23_142_857
    table = CliRunner().invoke(main, ["report", "--month", "2026-04", "--forecast"])
    assert table.exit_code == 0, table.output
    assert "$11.814286" in table.output
    assert "forecast over budget: user 1" in table.output
    plain = CliRunner().invoke(main, ["report", "--month", "2026-04", "--format", "json"])
    assert plain.exit_code == 0
    assert "user_id" not in plain.output  # by endpoint, unchanged
    assert {r["endpoint"] for r in json.loads(plain.output)} == {KLING, VEO}
    focus = CliRunner().invoke(main, ["report", "--month", "2026-04", "--format", "focus"])
    assert focus.exit_code == 0, focus.output
    assert focus.output.startswith("BilledCost") or "BilledCost" in focus.output.splitlines()[0]
    both = CliRunner().invoke(
        main, ["report", "--month", "2026-04", "--forecast", "--format", "focus"]
    )
    assert both.exit_code == 2
    assert "not focus" in both.output


def test_spend_forecast_asset_warns_about_users_forecast_past_their_budget(
    april, ledger_url: str
) -> None:
    result = materialize(
        [spend_forecast],
        resources={"ledger": LedgerDatabase(url=_clocked(ledger_url, "2026-04-11T00:00:00Z"))},
    )
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == CHECK
    assert not check.passed
    assert check.severity == AssetCheckSeverity.WARN
    assert check.metadata["users_over_budget"].value == [1]
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["user_1_forecast_usd"].value == pytest.approx(11.814286)
    assert metadata["user_1_budget_usd"].value == 10.0
    assert metadata["user_2_forecast_usd"].value == pytest.approx(0.54)
    assert metadata["user_2_budget_usd"].value == 5.0
    assert "user_3_budget_usd" not in metadata
    assert "| 1 | $4.100000 | $0.385714 | $11.814286 | $10.000000 | yes |" in (
        metadata["by_user"].value
    )


def test_spend_forecast_check_passes_when_every_user_is_within_budget(
    april, ledger_url: str
) -> None:
    set_budget(april, 1, 20_000_000, APRIL)
    april.commit()
    result = materialize(
        [spend_forecast],
        resources={"ledger": LedgerDatabase(url=_clocked(ledger_url, "2026-04-11T00:00:00Z"))},
    )
    (check,) = result.get_asset_check_evaluations()
    assert check.passed
