"""fal's usage by tag (X-Fal-Tags rq_user, rq_batch) beside the ledger's per-user and
per-batch totals: the simulator's usage API, the Platform client, the monthly asset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from batch_helpers import SEEDANCE, prompts, submit_file, write_csv
from spend_helpers import ADMIN_KEY, FalBilling, billed_month, settle, window

from renderqueue_pipeline.batch import BatchOptions
from renderqueue_pipeline.batch.single import submit_prompt
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.defs.spend.assets import billing_reconciliation_monthly
from renderqueue_pipeline.defs.spend.resources import BillingCheckResource, FalPlatformResource
from renderqueue_pipeline.fal_platform import FalPlatformError
from renderqueue_pipeline.settings import load_settings
from renderqueue_pipeline.spend import compare_usage_by_tag


def _batch(path: Path, ledger_url: str, user_id: int, n: int, tag: str) -> int:
    """A batch of `n` prompts for `user_id` through the real batch path; its id."""
    rows = prompts(n, user_id=user_id, duration="5", tag=tag)
    result = submit_file(
        write_csv(path, rows).as_uri(),
        BatchOptions(default_endpoint=SEEDANCE, concurrency=2),
        ledger_url=ledger_url,
    )
    return result.batch_id


def _clean_run(
    conn: psycopg.Connection, ledger_url: str, fal_billing: FalBilling, tmp_path: Path
) -> tuple[int, int, list[str]]:
    """Two batches (users 7 and 8) and one single prompt (user 8), all settled: the two
    batch ids and every request id."""
    first = _batch(tmp_path / "a.csv", ledger_url, 7, 2, "a")
    second = _batch(tmp_path / "b.csv", ledger_url, 8, 1, "b")
    submit_prompt(8, SEEDANCE, "an owl at dusk", {"duration": "4"}, ledger_url=ledger_url)
    conn.commit()
    ids = [r["request_id"] for r in conn.execute("select request_id from generations")]
    assert len(ids) == 4
    settle(conn, fal_billing.sim, ids)
    return first, second, ids


def _ours(conn: psycopg.Connection, where: str, value: int) -> int:
    """The ledger's own figure, summed here independently of the comparison's query."""
    # `where` is a column the test names
    return conn.execute(
        "select coalesce(sum(coalesce(g.computed_cost_micros, g.cost_micros)), 0)::bigint as m "  # noqa: S608
        "from generations g left join batch_items i on i.id = g.batch_item_id "
        f"where g.status = 'completed' and {where} = %s",
        (value,),
    ).fetchone()["m"]


def test_fals_usage_by_user_and_batch_equals_the_ledger_on_a_clean_run(
    conn, ledger_url, fal_billing, tmp_path
) -> None:
    first, second, _ = _clean_run(conn, ledger_url, fal_billing, tmp_path)
    start, end = window()
    with fal_billing.platform() as platform:
        result = compare_usage_by_tag(conn, platform, start, end)
    assert result.differences == []
    user7, user8 = result.of("rq_user", "7"), result.of("rq_user", "8")
    assert user7
    assert user8
    assert (user7.fal_requests, user8.fal_requests) == (2, 2)
    # 2 x 5 s and 5 s + 4 s of Seedance at $0.3034/s, to the micro-dollar
    assert user7.fal_micros == user7.our_micros == 10 * 303_400 == _ours(conn, "g.user_id", 7)
    assert user8.fal_micros == user8.our_micros == 9 * 303_400 == _ours(conn, "g.user_id", 8)
    batch1, batch2 = result.of("rq_batch", str(first)), result.of("rq_batch", str(second))
    assert batch1
    assert batch2
    assert batch1.fal_micros == batch1.our_micros == _ours(conn, "i.batch_id", first)
    assert batch2.fal_micros == batch2.our_micros == 5 * 303_400
    # the single prompt carries no rq_batch: "no batch" on both sides
    single = result.of("rq_batch", None)
    assert single
    assert single.fal_micros == single.our_micros == 4 * 303_400


def test_a_request_fal_billed_to_another_user_shows_as_a_difference(
    conn, ledger_url, fal_billing, tmp_path
) -> None:
    _clean_run(conn, ledger_url, fal_billing, tmp_path)
    moved = conn.execute(
        "select g.request_id, g.cost_micros from generations g join batch_items i "
        "on i.id = g.batch_item_id where g.user_id = 7 order by g.id limit 1"
    ).fetchone()
    # the ledger attributes one of user 7's requests to user 9 (fal's tags say 7)
    conn.execute("update generations set user_id = 9 where request_id = %s", (moved["request_id"],))
    conn.commit()
    start, end = window()
    with fal_billing.platform() as platform:
        result = compare_usage_by_tag(conn, platform, start, end)
    differing = {(t.tag_key, t.tag_value): t.difference_micros for t in result.differences}
    assert differing == {
        ("rq_user", "7"): moved["cost_micros"],
        ("rq_user", "9"): -moved["cost_micros"],
    }
    assert result.of("rq_user", "9").fal_requests == 0


def test_a_request_fal_billed_to_a_batch_the_ledger_does_not_shows_per_batch(
    conn, ledger_url, fal_billing, tmp_path
) -> None:
    first, _, _ = _clean_run(conn, ledger_url, fal_billing, tmp_path)
    moved = conn.execute(
        "select g.request_id, g.cost_micros from generations g join batch_items i "
        "on i.id = g.batch_item_id where i.batch_id = %s order by g.id limit 1",
        (first,),
    ).fetchone()
    conn.execute(
        "update generations set batch_item_id = null where request_id = %s", (moved["request_id"],)
    )
    conn.commit()
    start, end = window()
    with fal_billing.platform() as platform:
        result = compare_usage_by_tag(conn, platform, start, end)
    differing = {(t.tag_key, t.tag_value): t.difference_micros for t in result.differences}
    assert differing == {
        ("rq_batch", str(first)): moved["cost_micros"],
        ("rq_batch", None): -moved["cost_micros"],
    }


def test_usage_by_tag_filters_and_is_refused_until_enabled(
    conn, ledger_url, fal_billing, tmp_path
) -> None:
    _clean_run(conn, ledger_url, fal_billing, tmp_path)
    start, end = window()
    params = {"start": start.isoformat(), "end": end.isoformat(), "expand": "summary"}
    headers = {"Authorization": f"Key {ADMIN_KEY}"}
    only7 = fal_billing.control.get(
        "/v1/models/usage", params={**params, "tag": "rq_user:7"}, headers=headers
    ).json()["summary"]
    assert [(s["quantity"], s["cost_nano_usd"]) for s in only7] == [(10, 10 * 303_400_000)]
    fal_billing.configure(usage_by_tag=False)
    with fal_billing.platform() as platform, pytest.raises(FalPlatformError, match="not enabled"):
        platform.usage_by_tag(start, end, "rq_user")


def test_the_monthly_asset_checks_fals_usage_by_tag(
    conn, ledger_url, fal_billing, dagster_storage, tmp_path
) -> None:
    _, _, ids = _clean_run(conn, ledger_url, fal_billing, tmp_path)
    month = billed_month(fal_billing, ids)
    created = {
        r["m"]
        for r in conn.execute(
            "select to_char(created_at at time zone 'UTC', 'YYYY-MM') as m from generations"
        )
    }
    if created != {month}:  # not a wrong result: the run straddled a month end
        pytest.skip("submitted and billed across a month end")
    resources = {
        "ledger": LedgerDatabase(url=ledger_url),
        "fal_platform": FalPlatformResource(admin_key=ADMIN_KEY, api_url=fal_billing.api_url),
        "billing_check": BillingCheckResource.from_settings(load_settings()),
    }
    storage = {"storage": {"postgres": {"postgres_url": dagster_storage}}}

    def check() -> dg.AssetCheckEvaluation:
        run = dg.materialize(
            [billing_reconciliation_monthly],
            partition_key=f"{month}-01",
            resources=resources,
            instance=instance,
        )
        assert run.success
        evaluations = {c.check_name: c for c in run.get_asset_check_evaluations()}
        return evaluations["fal_usage_by_tag_matches_ledger"]

    with dg.instance_for_test(overrides=storage) as instance:
        assert check().passed
        conn.execute("update generations set user_id = 9 where request_id = %s", (ids[0],))
        conn.commit()
        failed = check()
        assert not failed.passed
        assert failed.metadata["tag_values_differing"].value == 2
        # usage by tag not enabled for the account: the month is still summarized, the
        # check fails and says why
        fal_billing.configure(usage_by_tag=False)
        refused = check()
        assert not refused.passed
        assert "not enabled" in refused.metadata["fal_usage_by_tag_error"].value


def test_the_cli_lists_the_users_whose_totals_differ_from_fals(
    ledger_env, conn, ledger_url, fal_billing, tmp_path
) -> None:
    _, _, ids = _clean_run(conn, ledger_url, fal_billing, tmp_path)
    moved = conn.execute(
        "select request_id from generations where user_id = 7 order by id limit 1"
    ).fetchone()["request_id"]
    conn.execute("update generations set user_id = 9 where request_id = %s", (moved,))
    conn.commit()
    month = billed_month(fal_billing, ids)
    env = {
        **fal_billing.sim.env,
        "DATABASE_URL": ledger_env,
        "RENDERQUEUE_FAL_API_URL": fal_billing.api_url,
        "FAL_ADMIN_KEY": ADMIN_KEY,
        "PATH": "/usr/bin:/bin",
    }
    command = [sys.executable, "-m", "renderqueue_pipeline.cli", "spend", "reconcile"]
    done = subprocess.run(
        [*command, "--month", month, "--by-tag"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "fal's usage by tag: " in out
    assert ", 2 differ" in out
    # one 5 s Seedance request ($1.517000): fal has it under user 7, the ledger under 9
    assert "rq_user=7: ours $1.517000 (1 requests), fal $3.034000 (2 requests)" in out
    assert "rq_user=9: ours $1.517000 (1 requests), fal $0.000000 (0 requests)" in out
    assert ADMIN_KEY not in out + done.stderr
