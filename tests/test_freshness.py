"""Freshness of the spend and billing assets on a real Dagster instance (Postgres storage):
materialize, move the clock, let the sensor pick the checks, run them, read the outcome."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.test_utils import InProcessTestWorkspaceLoadTarget, freeze_time
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._daemon.freshness import FreshnessDaemon
from dagster_graphql.test.utils import execute_dagster_graphql

from renderqueue_pipeline.dagster_home import dagster_storage_url
from renderqueue_pipeline.definitions import defs
from renderqueue_pipeline.defs.freshness.checks import FRESHNESS_CHECKS, freshness_checks_sensor
from renderqueue_pipeline.defs.freshness.policies import (
    current_month_policy,
    daily_billing_policy,
)
from renderqueue_pipeline.defs.reports.assets import monthly_spend_tables, spend_report_files
from renderqueue_pipeline.defs.reports.forecast import spend_forecast
from renderqueue_pipeline.defs.reports.resources import ReportStorage
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.defs.spend.assets import billing_reconciliation, fal_billing_events
from renderqueue_pipeline.defs.spend.resources import BillingCheckResource, FalPlatformResource
from renderqueue_pipeline.settings import load_settings

T0 = datetime(2026, 4, 11, 10, 0, tzinfo=UTC)
freshness_job = dg.define_asset_job(
    "freshness_checks_only", selection=dg.AssetSelection.checks(*FRESHNESS_CHECKS)
)
DEFS = dg.Definitions(
    assets=[
        monthly_spend_tables,
        spend_report_files,
        spend_forecast,
        fal_billing_events,
        billing_reconciliation,
    ],
    asset_checks=FRESHNESS_CHECKS,
    jobs=[freshness_job],
    sensors=[freshness_checks_sensor],
    # the checks read only the instance; the assets' resources are never built here
    resources={
        "ledger": LedgerDatabase(),
        "report_storage": ReportStorage(url="file:///never-built"),
        "fal_platform": FalPlatformResource(),
        "billing_check": BillingCheckResource(grace_hours=48, threshold_percent=0.5),
    },
)


@pytest.fixture
def instance(ledger_url: str) -> Iterator[dg.DagsterInstance]:
    storage = dagster_storage_url(ledger_url)
    with dg.instance_for_test(
        overrides={"storage": {"postgres": {"postgres_url": storage}}}
    ) as inst:
        yield inst


def run_freshness_checks(instance: dg.DagsterInstance) -> dict[str, dg.AssetCheckEvaluation]:
    """Every freshness check, as the sensor's runs execute them; outcome by asset name."""
    result = DEFS.resolve_job_def("freshness_checks_only").execute_in_process(instance=instance)
    assert result.success
    return {e.asset_key.to_user_string(): e for e in result.get_asset_check_evaluations()}


def sensor_requests(instance: dg.DagsterInstance) -> set[str]:
    """Assets whose freshness check the sensor asks to run now."""
    context = dg.build_sensor_context(instance=instance, definitions=DEFS)
    request = freshness_checks_sensor(context)
    if not isinstance(request, dg.RunRequest):
        return set()
    return {key.asset_key.to_user_string() for key in request.asset_check_keys or []}


def test_spend_assets_declare_freshness_policies_the_ui_shows() -> None:

    graph = defs().resolve_asset_graph()
    for name in (
        "monthly_spend_by_user",
        "monthly_spend_by_endpoint",
        "monthly_spend_by_batch",
        "daily_spend",
        "spend_report_files",
        "spend_forecast",
    ):
        assert graph.get(dg.AssetKey(name)).freshness_policy == current_month_policy, name
    for name in ("fal_billing_events", "billing_reconciliation"):
        assert graph.get(dg.AssetKey(name)).freshness_policy == daily_billing_policy, name
    sensor = defs().resolve_sensor_def("freshness_checks_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


@pytest.mark.slow
def test_current_month_asset_two_hours_without_refresh_is_a_failed_check(
    instance: dg.DagsterInstance, ledger_url: str
) -> None:
    with freeze_time(T0):
        done = dg.materialize(
            [spend_forecast],
            instance=instance,
            resources={"ledger": LedgerDatabase(url=ledger_url)},
        )
        assert done.success
        found = run_freshness_checks(instance)
    assert found["spend_forecast"].passed
    assert not found["monthly_spend_by_user"].passed  # never materialized: late
    assert found["monthly_spend_by_user"].severity == dg.AssetCheckSeverity.ERROR

    with freeze_time(T0 + timedelta(hours=1, minutes=59)):
        assert "spend_forecast" not in sensor_requests(instance)
        assert run_freshness_checks(instance)["spend_forecast"].passed

    with freeze_time(T0 + timedelta(hours=2, minutes=1)):
        assert "spend_forecast" in sensor_requests(instance)  # fresh_until has passed
        late = run_freshness_checks(instance)["spend_forecast"]
    assert not late.passed
    assert late.severity == dg.AssetCheckSeverity.ERROR
    key = dg.AssetCheckKey(dg.AssetKey("spend_forecast"), "freshness_check")
    (latest,) = instance.event_log_storage.get_asset_check_execution_history(key, limit=1)
    assert latest.status.value == "FAILED"


def test_billing_loaded_by_0800_utc_is_fresh_until_the_next_days_deadline(
    instance: dg.DagsterInstance, ledger_url: str
) -> None:
    resources = {
        "ledger": LedgerDatabase(url=ledger_url),
        "billing_check": BillingCheckResource.from_settings(load_settings()),
    }
    with freeze_time(datetime(2026, 4, 11, 5, 30, tzinfo=UTC)):  # the daily schedule's time
        done = dg.materialize(
            [billing_reconciliation],
            partition_key="2026-04-10",
            instance=instance,
            resources=resources,
        )
        assert done.success
    with freeze_time(datetime(2026, 4, 11, 9, 0, tzinfo=UTC)):
        found = run_freshness_checks(instance)
    assert found["billing_reconciliation"].passed
    assert not found["fal_billing_events"].passed  # nothing loaded today
    with freeze_time(datetime(2026, 4, 12, 8, 1, tzinfo=UTC)):  # no load since 04-12 00:00
        assert "billing_reconciliation" in sensor_requests(instance)
        late = run_freshness_checks(instance)["billing_reconciliation"]
    assert not late.passed


FRESHNESS_QUERY = """
query Freshness($assetKeys: [AssetKeyInput!], $assetKey: AssetKeyInput!) {
  assetNodes(assetKeys: $assetKeys) {
    assetKey { path }
    freshnessStatusInfo { freshnessStatus }
  }
  assetCheckExecutions(assetKey: $assetKey, checkName: "freshness_check", limit: 1) {
    status
  }
}
"""


@pytest.mark.slow
def test_the_ui_graphql_shows_spend_forecast_fresh_then_late(
    instance: dg.DagsterInstance, ledger_env: str
) -> None:
    """What the UI reads: the asset's freshness status (policy, evaluated by the freshness
    daemon) and its freshness check's last execution, for the project's code location."""

    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name="renderqueue_pipeline.definitions", attribute="defs")
    )
    key = {"path": ["spend_forecast"]}

    def ui_state(workspace: WorkspaceProcessContext) -> tuple[str, str | None]:
        list(FreshnessDaemon().run_iteration(workspace))  # one daemon tick
        result = execute_dagster_graphql(
            workspace.create_request_context(),
            FRESHNESS_QUERY,
            {"assetKeys": [key], "assetKey": key},
        )
        assert not result.errors, result.errors
        (node,) = result.data["assetNodes"]
        checks = result.data["assetCheckExecutions"]
        return node["freshnessStatusInfo"]["freshnessStatus"], (
            checks[0]["status"] if checks else None
        )

    with WorkspaceProcessContext(instance, InProcessTestWorkspaceLoadTarget(origin)) as workspace:
        with freeze_time(T0):
            done = dg.materialize(
                [spend_forecast],
                instance=instance,
                resources={"ledger": LedgerDatabase(url=ledger_env)},
            )
            assert done.success
            run_freshness_checks(instance)
            assert ui_state(workspace) == ("HEALTHY", "SUCCEEDED")
        with freeze_time(T0 + timedelta(hours=2, minutes=1)):
            run_freshness_checks(instance)
            assert ui_state(workspace) == ("DEGRADED", "FAILED")
