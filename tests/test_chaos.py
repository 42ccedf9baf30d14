"""`make chaos`, small: every fault at once, then the ledger audited against fal's truth.

The same run as `make chaos` (renderqueue_pipeline/chaos.py) at 16 rows: real processes
(embedded Postgres of its own, the simulator, a receiver under its restart loop, the CLI),
moto's S3 server in this process. Faults the simulator draws per request come from the seed
(request index -> decision), so which faults fire among the first 16 requests is fixed; the
kills and outages happen at counts of requests, never at a moment on the clock.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from renderqueue_pipeline.chaos import ChaosConfig, render, run_chaos

pytestmark = pytest.mark.e2e  # whole-product runs: `make test`, not `make test-fast`

#: faults drawn per request at rates high enough that 16 requests show each of them
RATES = {
    "failure_rate": 0.2,
    "payload_error_rate": 0.2,
    "requeue_rate": 0.3,
    "webhook_duplicate_rate": 0.3,
    "webhook_drop_rate": 0.2,
    "webhook_out_of_order_rate": 0.3,
    "webhook_out_of_order_delay": "0.2:1.0",
    "webhook_early_rate": 0.2,
    "api_429_rate": 0.05,
    "api_503_rate": 0.05,
    "api_502_rate": 0.02,
    "api_504_rate": 0.02,
}


@pytest.mark.timeout(420)
def test_every_fault_at_once_leaves_the_ledger_equal_to_what_fal_did(tmp_path: Path) -> None:
    config = ChaosConfig(
        rows=16,
        seed=19,
        kill_batch_at=4,
        concurrency=4,
        timeout=360,
        faults=RATES,
        kill_dagster_worker=False,
    )
    result = run_chaos(tmp_path / "chaos-home", config)
    fired = {row.fault: row.fired for row in result.faults}
    assert result.mismatches == [], result.mismatches
    assert result.requests >= 16
    for fault in (
        "model errors (ERROR webhook, 422)",
        "payload errors (OK webhook, payload null)",
        "duplicate webhooks",
        "out-of-order webhooks",
        "early webhooks (before submit answered)",
        "dropped webhooks",
        "batch process killed -9, rerun",
        "webhook receiver killed -9",
        "Postgres stopped and started",
        "archive run with S3 down",
    ):
        assert fired[fault] >= 1, (fault, fired)
    assert render(result).caption.startswith("ledger == fal's ground truth")
