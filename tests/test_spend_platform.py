"""fal's Platform APIs through our client, against the simulator: prices kept current,
pagination, the 90-day cap, and a refused admin key."""

from __future__ import annotations

import datetime as dt
import ssl
import subprocess
import sys

import httpx
import pytest
from spend_helpers import ADMIN_KEY, billed_month, settle, submit, window

from renderqueue_pipeline.db.migrate import sql_dir
from renderqueue_pipeline.fal_platform import FalPlatform, FalPlatformAuthError
from renderqueue_pipeline.simulator.platform import seed_prices
from renderqueue_pipeline.spend import check_billing, load_billing_events, sync_prices

SEEDANCE = "bytedance/seedance-2.0/text-to-video"
KLING = "fal-ai/kling-video/v3/turbo/pro/text-to-video"


def test_the_simulator_prices_like_the_ledger_seed(conn) -> None:
    """The simulator's default price list is the ledger's seed prices, row for row."""
    rows = conn.execute(
        "select endpoint, resolution, with_audio, micros_per_second, base_micros,"
        " base_seconds::float as base_seconds from prices where price_version = 'fal-2026-11'"
    ).fetchall()
    ledger = {tuple(r.values()) for r in rows}
    simulator = {
        (p.endpoint, p.resolution, p.with_audio, p.micros_per_second, p.base_micros, p.base_seconds)
        for p in seed_prices()
    }
    assert simulator == ledger


def test_a_price_change_at_fal_is_a_new_row_for_later_generations_only(
    conn,
    fal_billing,
) -> None:
    before = submit(conn, SEEDANCE, {"prompt": "before the change", "duration": "5"})
    with fal_billing.platform() as platform:
        unchanged = sync_prices(conn, platform)
    assert unchanged.added_rows == []
    assert SEEDANCE in unchanged.unchanged

    fal_billing.set_price(SEEDANCE, 0.35)  # fal's 720p price moves from $0.3034 to $0.35
    seen_at = dt.datetime.now(dt.UTC)
    with fal_billing.platform() as platform:
        changed = sync_prices(conn, platform, now=seen_at)
    assert changed.changed == [SEEDANCE]
    new_rows = conn.execute(
        "select resolution, micros_per_second, price_version, source, effective_from"
        " from prices where endpoint = %s and effective_from = %s order by resolution",
        (SEEDANCE, seen_at),
    ).fetchall()
    by_resolution = {r["resolution"]: r for r in new_rows}
    assert by_resolution["720p"]["micros_per_second"] == 350_000
    assert by_resolution["1080p"]["micros_per_second"] == round(680_400 * 350_000 / 303_400)
    assert all(r["price_version"] == f"fal-api-{seen_at:%Y-%m-%d}" for r in new_rows)
    assert all(r["source"].startswith("fal Platform API GET /v1/models/pricing") for r in new_rows)
    # history is never edited: the seed rows are still there, unchanged
    old = conn.execute(
        "select micros_per_second from prices where endpoint = %s and resolution = '720p'"
        " and price_version = 'fal-2026-11'",
        (SEEDANCE,),
    ).fetchone()
    assert old["micros_per_second"] == 303_400
    # running again finds nothing new
    with fal_billing.platform() as platform:
        assert sync_prices(conn, platform).added_rows == []

    after = submit(conn, SEEDANCE, {"prompt": "after the change", "duration": "5"})
    settle(conn, fal_billing.sim, [before, after])
    rows = conn.execute("select request_id, cost_micros from generations").fetchall()
    costs = {r["request_id"]: r["cost_micros"] for r in rows}
    assert costs == {before: 5 * 303_400, after: 5 * 350_000}
    start, end = window()
    with fal_billing.platform() as platform:
        load_billing_events(conn, platform, start, end)
    result = check_billing(conn, start, end)
    assert result.count("matched") == 2
    assert result.findings == 0


def test_a_unit_the_ledger_cannot_represent_is_flagged(conn, fal_billing) -> None:
    fal_billing.control.put(
        "/_sim/billing/prices", json={"endpoint_id": KLING, "unit_price": 0.7, "unit": "video"}
    ).raise_for_status()
    with fal_billing.platform() as platform:
        result = sync_prices(conn, platform, endpoints=[KLING, SEEDANCE, "acme/unknown-model"])
    assert result.unrepresentable == [
        {"endpoint": KLING, "unit": "video", "unit_price": 0.7, "currency": "USD"}
    ]
    assert result.not_priced_by_fal == ["acme/unknown-model"]
    assert result.added_rows == []


def test_billing_events_page_by_ten_thousand(conn, fal_billing) -> None:
    start, end = window()
    fal_billing.add_synthetic(
        count=25_000,
        start=start.timestamp(),
        end=(start + dt.timedelta(days=1)).timestamp(),
        prefix="page-test-",
    )
    with fal_billing.platform() as platform:
        pages = [len(page) for page in platform.billing_event_pages(start, end)]
        assert pages == [10_000, 10_000, 5_000]
        loaded = load_billing_events(conn, platform, start, end)
    assert (loaded.pages, loaded.events, loaded.requests) == (3, 25_000, 25_000)
    # one second of 4 + i % 12 seconds at $0.3034, summed exactly
    expected_nanos = sum((4 + i % 12) * 303_400_000 for i in range(25_000))
    assert loaded.nano_usd == expected_nanos
    # loading again replaces the range: no duplicates
    with fal_billing.platform() as platform:
        again = load_billing_events(conn, platform, start, end)
    assert again.events == 25_000
    # a smaller page size gives the same events
    with fal_billing.platform() as platform:
        ids = [
            e["request_id"]
            for p in platform.billing_event_pages(start, end, page_size=7_000)
            for e in p
        ]
    assert len(ids) == len(set(ids)) == 25_000


def test_the_api_caps_ranges_at_90_days_and_the_client_splits_them(fal_billing) -> None:
    end = dt.datetime.now(dt.UTC)
    start = end - dt.timedelta(days=100)
    response = fal_billing.control.get(
        "/v1/models/billing-events",
        params={"start": start.isoformat(), "end": end.isoformat()},
        headers={"Authorization": f"Key {ADMIN_KEY}"},
    )
    assert response.status_code == 422
    assert "90 days" in response.json()["error"]["message"]
    response = fal_billing.control.get(
        "/v1/models/billing-events",
        params={"limit": 10_001},
        headers={"Authorization": f"Key {ADMIN_KEY}"},
    )
    assert response.status_code == 422
    fal_billing.add_events(
        [
            {
                "request_id": f"old-{n}",
                "endpoint_id": KLING,
                "timestamp": (start + dt.timedelta(days=n * 30 + 1)).isoformat(),
                "output_units": 5,
                "unit_price": 0.14,
            }
            for n in range(4)
        ]
    )
    with fal_billing.platform() as platform:
        seen = [e["request_id"] for p in platform.billing_event_pages(start, end) for e in p]
        assert platform.requests_made == 2  # two windows: 90 days, then 10
    assert seen == ["old-0", "old-1", "old-2", "old-3"]


def test_usage_summary_sums_billed_seconds_and_cost(conn, fal_billing) -> None:
    ids = [submit(conn, KLING, {"prompt": f"kite {n}", "duration": "5"}) for n in range(2)]
    settle(conn, fal_billing.sim, ids)
    start, end = window()
    with fal_billing.platform() as platform:
        (summary,) = platform.usage_summary(start, end, [KLING])
    assert summary["endpoint_id"] == KLING
    assert summary["quantity"] == 10
    assert summary["cost_nano_usd"] == 10 * 140_000_000


def test_a_wrong_admin_key_is_a_clear_error_naming_the_variable(fal_billing) -> None:
    platform = FalPlatform("not-the-admin-key", base_url=fal_billing.api_url)
    with platform, pytest.raises(FalPlatformAuthError) as caught:
        platform.pricing([SEEDANCE])
    message = str(caught.value)
    assert message.startswith("FAL_ADMIN_KEY: fal's Platform API refused the admin key")
    assert "not-the-admin-key" not in message
    assert "not-the-admin-key" not in repr(platform)


def test_the_cli_reports_a_wrong_admin_key_in_one_line(
    ledger_env,
    fal_billing,
    monkeypatch,
) -> None:
    env = {
        **fal_billing.sim.env,
        "DATABASE_URL": ledger_env,
        "RENDERQUEUE_FAL_API_URL": fal_billing.api_url,
        "FAL_ADMIN_KEY": "wrong-key-123",
        "PATH": "/usr/bin:/bin",
    }
    month = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    done = subprocess.run(
        [sys.executable, "-m", "renderqueue_pipeline.cli", "spend", "reconcile", "--month", month],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "renderqueue: FAL_ADMIN_KEY: fal's Platform API refused the admin key "
        "(HTTP 401: Invalid admin key)"
    ]
    assert "wrong-key-123" not in done.stdout + done.stderr
    # FAL_KEY is the fallback, and then the error names FAL_KEY
    env.pop("FAL_ADMIN_KEY")
    env["FAL_KEY"] = "wrong-key-456"
    done = subprocess.run(
        [sys.executable, "-m", "renderqueue_pipeline.cli", "spend", "reconcile", "--month", month],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("renderqueue: FAL_KEY: ")


def test_the_cli_prints_the_month(ledger_env, conn, fal_billing) -> None:
    request_id = submit(conn, SEEDANCE, {"prompt": "a summary", "duration": "4"})
    settle(conn, fal_billing.sim, [request_id])
    fal_billing.configure(units_mismatch_rate=1.0)  # fal bills the next one 5 s for 4
    other = submit(conn, SEEDANCE, {"prompt": "a difference", "duration": "4"})
    settle(conn, fal_billing.sim, [other])
    env = {
        **fal_billing.sim.env,
        "DATABASE_URL": ledger_env,
        "RENDERQUEUE_FAL_API_URL": fal_billing.api_url,
        "FAL_ADMIN_KEY": ADMIN_KEY,
        "PATH": "/usr/bin:/bin",
    }
    month = billed_month(fal_billing, [request_id, other])
    done = subprocess.run(
        [sys.executable, "-m", "renderqueue_pipeline.cli", "spend", "reconcile", "--month", month],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "matched" in out
    assert "amount_differs" in out
    assert "our computed total      $2.427200" in out  # 2 x 4 s x $0.3034
    assert "fal's billed total      $2.730600" in out  # one billed 5 s
    assert f"{other}  {SEEDANCE}  amount_differs (units)" in out
    assert ADMIN_KEY not in out + done.stderr
    assert sql_dir().is_dir()


def test_platform_api_needs_credentials(fal_billing) -> None:
    response = httpx.get(
        f"{fal_billing.api_url}/models/pricing",
        params={"endpoint_id": SEEDANCE},
        verify=ssl.create_default_context(cafile=fal_billing.sim.ca_bundle),
    )
    assert response.status_code == 401
