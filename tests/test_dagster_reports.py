"""Spend report assets on a real Dagster instance with Postgres storage; files on disk and
in S3 (moto's S3 server); the schedules' run requests."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from urllib.parse import quote

import fsspec
import pandas as pd
import psycopg
import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    build_schedule_context,
    build_sensor_context,
    instance_for_test,
    materialize,
)
from report_helpers import (
    KLING,
    KLING_MICROS_PER_SECOND,
    VEO,
    VEO_MICROS_PER_SECOND,
    add_generation,
    table,
    utc,
)
from s3_helpers import s3_client

from renderqueue_pipeline.defs.reports import assets, checks
from renderqueue_pipeline.defs.reports.resources import ReportStorage
from renderqueue_pipeline.defs.reports.schedules import (
    spend_report_current_month_schedule,
    spend_report_finalize_schedule,
)
from renderqueue_pipeline.defs.reports.sensors import spend_report_changed_months_sensor
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.reports.checks import report_matches_ledger
from renderqueue_pipeline.reports.figures import REPORT_TABLES
from renderqueue_pipeline.reports.storage import CHART_NAME

pytestmark = pytest.mark.e2e  # whole months materialized in Dagster, files written and read back

MARCH = date(2026, 3, 1)
EVERYTHING = [
    assets.monthly_spend_tables,
    assets.spend_report_files,
    checks.report_by_user_matches_ledger,
    checks.report_by_endpoint_matches_ledger,
    checks.completed_generations_are_priced,
    checks.no_generation_open_over_24h,
    checks.no_archive_failures,
]
BUCKET = "rq-reports"


@pytest.fixture
def instance(dagster_storage: str) -> Iterator[DagsterInstance]:
    storage = dagster_storage
    with instance_for_test(overrides={"storage": {"postgres": {"postgres_url": storage}}}) as inst:
        assert type(inst.run_storage).__name__ == "PostgresRunStorage"
        yield inst


def march_ledger(conn: psycopg.Connection) -> int:
    """Two users, two endpoints, every status; returns the month's cost in micro-dollars."""
    rows = [
        (1, KLING, "completed", 5, utc(2026, 3, 1)),
        (1, KLING, "completed", 10, utc(2026, 3, 31, 23, 59, 59, 999000)),
        (1, KLING, "failed", 5, utc(2026, 3, 2)),
        (2, VEO, "completed", 8, utc(2026, 3, 3)),
        (2, VEO, "canceled", 8, utc(2026, 3, 4)),
    ]
    price = {KLING: KLING_MICROS_PER_SECOND, VEO: VEO_MICROS_PER_SECOND}
    for user, endpoint, status, seconds, created in rows:
        add_generation(
            conn,
            created_at=created,
            status=status,
            user_id=user,
            endpoint=endpoint,
            seconds=seconds,
            cost_micros=seconds * price[endpoint],
        )
    add_generation(
        conn,
        created_at=utc(2026, 2, 28, 23, 59, 59, 999000),
        status="completed",
        seconds=9,
        cost_micros=9 * KLING_MICROS_PER_SECOND,
    )
    conn.commit()
    return sum(s * price[e] for _, e, status, s, _ in rows if status == "completed")


def run_month(instance, ledger_url: str, storage_url: str, partition: str = "2026-03-01"):
    return materialize(
        EVERYTHING,
        partition_key=partition,
        instance=instance,
        resources={
            "ledger": LedgerDatabase(url=ledger_url),
            "report_storage": ReportStorage(url=storage_url),
        },
        raise_on_error=False,
    )


def checks_of(result) -> dict:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def read_back(storage_url: str, name: str, kind: str) -> pd.DataFrame:

    url = f"{storage_url}/reports/spend/2026-03/{name}.{kind}"
    with fsspec.open(url, "rb", skip_instance_cache=True) as f:
        data = f.read()
    return pd.read_parquet(io.BytesIO(data)) if kind == "parquet" else pd.read_csv(io.BytesIO(data))


def assert_files_equal_tables(conn: psycopg.Connection, storage_url: str) -> None:
    for name in REPORT_TABLES:
        rows = conn.execute(
            f"select * from {name} where month = %s",  # noqa: S608 - REPORT_TABLES, our constant
            (MARCH,),
        ).fetchall()
        expected = pd.DataFrame(rows)
        key = (
            ["day", "endpoint"]
            if name == "spend_daily"
            else [c for c in ("user_id", "endpoint", "batch_id") if c in expected.columns][:1]
        )
        expected = expected.sort_values(key).reset_index(drop=True)
        parquet = read_back(storage_url, name, "parquet").sort_values(key).reset_index(drop=True)
        columns = list(expected.columns)
        columns.insert(columns.index("cost_micros") + 1, "cost_usd")  # dollars beside micros
        assert list(parquet.columns) == columns
        for column in expected.columns:
            assert [same_value(v) for v in parquet[column]] == [
                same_value(v) for v in expected[column]
            ], (name, column)
        assert (parquet["cost_usd"] * 1_000_000).round().astype(int).tolist() == expected[
            "cost_micros"
        ].tolist()
        csv = read_back(storage_url, name, "csv").sort_values(key).reset_index(drop=True)
        assert len(csv) == len(expected)
        for column in ("generations", "completed", "cost_micros", "cost_cents"):
            assert csv[column].tolist() == expected[column].tolist(), (name, column)
        assert [Decimal(str(v)) for v in csv["billed_seconds"]] == expected[
            "billed_seconds"
        ].tolist()


def same_value(value: object) -> object:
    """A cell as compared across Postgres and Parquet: numbers as exact decimals, null as None."""
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        return None
    if isinstance(value, pd.Timestamp) and value.tzinfo is None:  # a month or a day
        return value.date()
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return Decimal(str(value)).normalize()
    return value


def test_report_parquet_files_read_with_analyst_types(
    conn: psycopg.Connection, ledger_url: str, instance, tmp_path
) -> None:
    """pandas reads every column but text as a number or a time: seconds are floats, money
    is integer micro-dollars and cents with `cost_usd` beside them, nothing is `Decimal`."""
    march_ledger(conn)
    storage = tmp_path.as_uri()
    assert run_month(instance, ledger_url, storage).success
    for name in REPORT_TABLES:
        frame = read_back(storage, name, "parquet")
        assert len(frame) > 0, name
        for column in frame.columns:
            if frame[column].dtype == object:
                assert all(isinstance(v, str) for v in frame[column].dropna()), (name, column)
        assert frame["billed_seconds"].dtype == "float64", name
        assert frame["cost_micros"].dtype == "int64", name
        assert frame["cost_usd"].dtype == "float64", name
        if "micros_per_completed_second" in frame.columns:  # not in spend_daily
            assert frame["micros_per_completed_second"].dtype == "float64", name


def test_month_materializes_checks_pass_and_files_equal_tables(
    conn: psycopg.Connection, ledger_url: str, instance, tmp_path
) -> None:
    cost = march_ledger(conn)
    storage = f"file://{tmp_path}/storage"
    result = run_month(instance, ledger_url, storage)
    assert result.success
    by_user = result.asset_materializations_for_node("monthly_spend_tables")
    metadata = {m.asset_key.to_user_string(): m.metadata for m in by_user}
    assert set(metadata) == {
        "monthly_spend_by_user",
        "monthly_spend_by_endpoint",
        "monthly_spend_by_batch",
        "daily_spend",
    }
    users = metadata["monthly_spend_by_user"]
    assert users["dagster/partition_row_count"].value == 2
    assert users["cost_micros"].value == cost
    assert users["total_spend_usd"].value == pytest.approx(cost / 1_000_000)
    # nothing billed by fal in this ledger: ours only, fal's figures shown as not yet known
    assert users["computed_usd"].value == pytest.approx(cost / 1_000_000)
    assert (users["billed_generations"].value, users["fal_billed"].value) == (0, "-")
    assert "fal_billed_usd" not in users
    assert users["generations"].value == 5
    assert users["state"].value == "final"  # March is past its grace period
    assert "| 2 |" in users["top_10"].value  # user 2 spent the most
    assert metadata["daily_spend"]["dagster/partition_row_count"].value == 5  # days with spend
    for name, (table_name, _) in assets.TABLE_ASSETS.items():
        count = psycopg.sql.SQL("select count(*) as n from {} where month = %s")
        month_rows = conn.execute(
            count.format(psycopg.sql.Identifier(table_name)), (date(2026, 3, 1),)
        ).fetchone()["n"]
        assert metadata[name]["dagster/partition_row_count"].value == month_rows, name
        # a partition's rows are not the table's: the UI shows dagster/row_count as the table's
        assert "dagster/row_count" not in metadata[name], name
    evaluations = checks_of(result)
    assert len(evaluations) == 5
    assert all(e.passed for e in evaluations.values())
    assert evaluations["report_by_user_matches_ledger"].metadata["ledger_cost_micros"].value == cost
    assert evaluations["no_archive_failures"].metadata["archive_failures"].value == 0

    files = result.asset_materializations_for_node("spend_report_files")[0].metadata
    assert "dagster/row_count" not in files  # rows of four tables' files: no one table's
    assert files["chart"].value == f"{storage}/reports/spend/2026-03/{CHART_NAME}"
    png = (tmp_path / "storage" / "reports" / "spend" / "2026-03" / CHART_NAME).read_bytes()
    assert png.startswith(b"\x89PNG")
    assert_files_equal_tables(conn, storage)

    # the partition again: the same rows
    before = {n: table(conn, n, MARCH) for n in REPORT_TABLES}
    assert run_month(instance, ledger_url, storage).success
    assert {n: table(conn, n, MARCH) for n in REPORT_TABLES} == before


def test_blocking_check_stops_the_files(
    conn: psycopg.Connection, ledger_url: str, instance, tmp_path
) -> None:
    march_ledger(conn)
    rid = add_generation(
        conn,
        created_at=utc(2026, 3, 6),
        status="completed",
        endpoint="acme/unlisted-model",
        seconds=5,
        cost_basis="unpriced",
    )
    add_generation(
        conn,
        created_at=utc(2026, 3, 7),
        status="in_progress",
        seconds=5,
        cost_micros=5 * KLING_MICROS_PER_SECOND,
    )
    conn.commit()
    result = run_month(instance, ledger_url, f"file://{tmp_path}/storage")
    evaluations = checks_of(result)
    priced = evaluations["completed_generations_are_priced"]
    assert not priced.passed
    assert priced.metadata["first_unpriced"].value == [f"{rid} (acme/unlisted-model, unpriced)"]
    stuck = evaluations["no_generation_open_over_24h"]
    assert not stuck.passed
    assert stuck.metadata["open_over_24h"].value == 1
    assert not result.asset_materializations_for_node("spend_report_files")
    assert not (tmp_path / "storage" / "reports").exists()
    # the tables were still written (and say what they hold)
    assert instance.get_latest_materialization_event(AssetKey("monthly_spend_by_endpoint"))


def test_stale_rollup_fails_the_ledger_check_in_the_current_month(
    conn: psycopg.Connection, ledger_url: str, instance, tmp_path
) -> None:
    """The ledger's clock pinned to the 20th: the month is open with settled days before
    today, whatever the real date (no skip on the 1st and 2nd, no midnight race)."""
    now = datetime(2026, 3, 20, 12, tzinfo=UTC)
    month = date(now.year, now.month, 1)
    pinned_url = f"{ledger_url}&options=" + quote(f"-c renderqueue.now={now.isoformat()}")
    add_generation(
        conn,
        created_at=datetime(now.year, now.month, 1, 10, tzinfo=UTC),
        status="completed",
        seconds=5,
        cost_micros=5 * KLING_MICROS_PER_SECOND,
    )
    conn.commit()
    storage = f"file://{tmp_path}/storage"
    first = run_month(instance, pinned_url, storage, partition=f"{month:%Y-%m-%d}")
    assert first.success
    assert (
        first.asset_materializations_for_node("monthly_spend_tables")[0].metadata["state"].value
        == "open"
    )
    # a cached day edited behind the report's back (what a lost change would look like)
    conn.execute(
        "update spend_rollup_daily set cost_micros = cost_micros + 1 where day = %s", (month,)
    )
    conn.commit()
    second = run_month(instance, pinned_url, storage, partition=f"{month:%Y-%m-%d}")
    evaluation = checks_of(second)["report_by_user_matches_ledger"]
    assert not evaluation.passed
    assert evaluation.metadata["difference_micros"].value == 1
    assert "rebuild: true" in evaluation.description


def test_files_in_s3(conn: psycopg.Connection, ledger_url: str, instance, s3_env: str) -> None:
    s3 = s3_client(s3_env)
    s3.create_bucket(Bucket=BUCKET)
    march_ledger(conn)
    storage = f"s3://{BUCKET}/analytics"
    result = run_month(instance, ledger_url, storage)
    assert result.success
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"])
    assert keys == sorted(
        [
            f"analytics/reports/spend/2026-03/{t}.{k}"
            for t in (*REPORT_TABLES, "focus")
            for k in ("parquet", "csv")
        ]
        + [f"analytics/reports/spend/2026-03/{CHART_NAME}"]
    )
    files = result.asset_materializations_for_node("spend_report_files")[0].metadata
    assert "dagster/row_count" not in files  # rows of four tables' files: no one table's
    assert files["chart"].value == f"{storage}/reports/spend/2026-03/{CHART_NAME}"
    assert_files_equal_tables(conn, storage)


def test_schedules_ask_for_the_right_months(instance) -> None:
    hourly = spend_report_current_month_schedule(
        build_schedule_context(
            instance=instance, scheduled_execution_time=datetime(2026, 11, 29, 14, 15, tzinfo=UTC)
        )
    )
    assert hourly.partition_key == "2026-11-01"
    assert hourly.run_key == "2026-11@2026-11-29T14:15"
    on_new_year = spend_report_finalize_schedule(
        build_schedule_context(
            instance=instance, scheduled_execution_time=datetime(2027, 1, 1, 6, tzinfo=UTC)
        )
    )
    assert on_new_year.partition_key == "2026-12-01"
    assert on_new_year.run_config["ops"]["monthly_spend_tables"]["config"] == {"rebuild": True}
    assert spend_report_finalize_schedule.cron_schedule == "0 6 1 * *"
    for schedule in (spend_report_current_month_schedule, spend_report_finalize_schedule):
        assert schedule.default_status.value == "RUNNING"


def sensor_tick(instance, ledger_url: str):
    return spend_report_changed_months_sensor(
        build_sensor_context(
            instance=instance, resources={"ledger": LedgerDatabase(url=ledger_url)}
        )
    )


def test_a_final_month_changed_later_is_rebuilt_by_the_sensor_one_run_at_a_time(
    conn: psycopg.Connection, ledger_url: str, instance, tmp_path
) -> None:
    cost = march_ledger(conn)
    storage = f"file://{tmp_path}/storage"
    first = run_month(instance, ledger_url, storage)  # March is long final: finalized now
    assert first.success
    quiet = sensor_tick(instance, ledger_url)
    assert not quiet.run_requests
    assert quiet.skip_reason.skip_message == "no month changed since its last rebuild"

    # a late change to the final month, by raw SQL: the check fails, the sensor sees it
    conn.execute(
        "update generations set cost_micros = cost_micros + 5"
        " where created_at = '2026-03-01T00:00:00Z'"
    )
    conn.commit()
    assert not report_matches_ledger(conn, MARCH, "user").passed
    (request,) = sensor_tick(instance, ledger_url).run_requests
    assert request.partition_key == "2026-03-01"
    assert request.job_name in (None, "spend_report")
    assert request.run_config["ops"]["monthly_spend_tables"]["config"] == {"rebuild": True}
    assert request.tags["renderqueue/report_mode"] == "rebuild"

    # while a run of that partition is in flight, no second one is asked for
    running = DagsterRun(
        job_name="spend_report",
        run_id=str(uuid.uuid4()),
        status=DagsterRunStatus.STARTED,
        tags={"dagster/partition": "2026-03-01"},
    )
    instance.add_run(running)
    waiting = sensor_tick(instance, ledger_url)
    assert not waiting.run_requests
    assert waiting.skip_reason.skip_message == (
        f"2026-03: rebuild run {running.run_id[:8]} in flight"
    )
    instance.delete_run(running.run_id)

    (request,) = sensor_tick(instance, ledger_url).run_requests
    rebuilt = materialize(
        EVERYTHING,
        partition_key=request.partition_key,
        instance=instance,
        run_config=request.run_config,
        tags=request.tags,
        resources={
            "ledger": LedgerDatabase(url=ledger_url),
            "report_storage": ReportStorage(url=storage),
        },
    )
    assert rebuilt.success
    assert all(e.passed for e in rebuilt.get_asset_check_evaluations())
    metadata = rebuilt.asset_materializations_for_node("monthly_spend_tables")[0].metadata
    assert metadata["cost_micros"].value == cost + 5
    assert metadata["changed_after_finalization"].value == "yes"
    assert metadata["last_changed_at"].value != "-"
    assert metadata["rebuilt"].value is True
    assert (
        table(conn, "spend_monthly_by_user", MARCH)[0]["cost_micros"]
        == cost - (8 * VEO_MICROS_PER_SECOND) + 5
    )
    after = sensor_tick(instance, ledger_url)
    assert not after.run_requests
    assert "no month changed" in after.skip_reason.skip_message
    assert spend_report_changed_months_sensor.default_status.value == "RUNNING"
