"""Money: estimates at submit, actual cost at completion, micro-dollar exact."""

from __future__ import annotations

from decimal import Decimal

import psycopg
import pytest
from ledger_helpers import SEEDANCE, generation, submit_row, video_payload

from renderqueue_pipeline.ledger import LedgerEvent, estimate_cost, record_event

# (endpoint, inputs, expected micro-dollars) from the list prices in shared/fal-wire.md
ESTIMATES = [
    (SEEDANCE, {"prompt": "p", "duration": "5", "resolution": "720p"}, 5 * 303_400),
    (SEEDANCE, {"prompt": "p", "duration": "5"}, 5 * 303_400),  # 720p is the default
    (SEEDANCE, {"prompt": "p", "duration": 5, "resolution": "1080p"}, 5 * 680_400),
    (SEEDANCE, {"prompt": "p", "duration": "4", "resolution": "480p"}, 4 * 134_505),
    (SEEDANCE, {"prompt": "p", "duration": "auto"}, 15 * 303_400),  # auto: the 15 s maximum
    ("bytedance/seedance-2.0/fast/text-to-video", {"prompt": "p", "duration": "10"}, 10 * 241_900),
    ("fal-ai/seedance-2.0/text-to-video", {"prompt": "p", "duration": 5}, 5 * 303_400),
    ("fal-ai/veo3.1", {"prompt": "p", "duration": "8s"}, 8 * 400_000),  # audio on by default
    ("fal-ai/veo3.1", {"prompt": "p", "duration": "8s", "generate_audio": False}, 8 * 200_000),
    ("fal-ai/veo3.1", {"prompt": "p", "resolution": "1080p", "generate_audio": True}, 8 * 400_000),
    ("fal-ai/veo3.1", {"prompt": "p", "resolution": "4k", "generate_audio": False}, 8 * 400_000),
    ("fal-ai/veo3.1", {"prompt": "p", "resolution": "4k", "duration": "6s"}, 6 * 600_000),
    ("fal-ai/kling-video/v3/turbo/pro/text-to-video", {"prompt": "p", "duration": "10"}, 1_400_000),
    ("fal-ai/kling-video/v3/turbo/pro/text-to-video", {"prompt": "p"}, 5 * 140_000),
    ("fal-ai/kling-video/v2.5-turbo/pro/image-to-video", {"prompt": "p", "duration": "5"}, 350_000),
    (
        "fal-ai/kling-video/v2.5-turbo/pro/image-to-video",
        {"prompt": "p", "duration": "10"},
        700_000,
    ),
    ("fal-ai/kling-video/v2.5-turbo/pro/image-to-video", {"prompt": "p", "duration": 3}, 350_000),
]


@pytest.mark.parametrize(("endpoint", "inputs", "micros"), ESTIMATES)
def test_estimate_for_each_seeded_endpoint(
    conn: psycopg.Connection, endpoint: str, inputs: dict, micros: int
) -> None:
    assert estimate_cost(conn, endpoint, inputs).cost_micros == micros


def test_every_seeded_endpoint_is_covered_above(conn: psycopg.Connection) -> None:
    seeded = {r["endpoint"] for r in conn.execute("select distinct endpoint from prices")}
    assert seeded == {endpoint for endpoint, _, _ in ESTIMATES}


def test_submit_records_the_estimate_and_its_price(conn: psycopg.Connection) -> None:
    request_id, intent = submit_row(conn)
    row = generation(conn, request_id)
    assert (row["cost_micros"], row["cost_cents"], row["cost_basis"]) == (
        1_517_000,
        152,
        "estimate",
    )
    assert row["price_id"] == intent.estimate.price_id
    assert row["billed_seconds"] == Decimal(5)


def test_completion_replaces_the_estimate_with_the_actual_seconds(
    conn: psycopg.Connection,
) -> None:
    request_id, _ = submit_row(
        conn, inputs={"prompt": "fox", "duration": "auto", "resolution": "1080p"}
    )
    assert generation(conn, request_id)["cost_micros"] == 15 * 680_400
    record_event(conn, LedgerEvent(request_id, "completed", video_payload(seconds=5.04)))
    row = generation(conn, request_id)
    # 5.04 s x $0.6804/s = $3.429216, exact to the micro-dollar
    assert (row["cost_micros"], row["cost_cents"], row["cost_basis"]) == (3_429_216, 343, "actual")
    assert row["billed_seconds"] == Decimal("5.04")


def test_completion_without_a_duration_bills_the_requested_seconds(
    conn: psycopg.Connection,
) -> None:
    request_id, _ = submit_row(conn)
    payload = video_payload()
    del payload["video"]["duration"]
    record_event(conn, LedgerEvent(request_id, "completed", payload))
    assert generation(conn, request_id)["cost_micros"] == 5 * 303_400


@pytest.mark.parametrize("kind", ["failed", "canceled"])
def test_failed_and_canceled_cost_nothing(conn: psycopg.Connection, kind: str) -> None:
    request_id, _ = submit_row(conn)
    record_event(
        conn, LedgerEvent(request_id, kind, {"detail": "nope"}, "Invalid status code: 422")
    )
    row = generation(conn, request_id)
    assert (row["status"], row["cost_micros"], row["cost_cents"]) == (kind, 0, 0)


@pytest.mark.parametrize(
    ("micros", "cents"),
    [(0, 0), (4_999, 0), (5_000, 1), (14_999, 1), (15_000, 2), (25_000, 3), (1_517_000, 152)],
)
def test_cost_cents_is_micros_rounded_half_up(
    conn: psycopg.Connection, micros: int, cents: int
) -> None:
    request_id, _ = submit_row(conn)
    conn.execute(
        "update generations set cost_micros = %s where request_id = %s", (micros, request_id)
    )
    assert generation(conn, request_id)["cost_cents"] == cents


def test_a_raw_cost_cents_write_keeps_micros_consistent(conn: psycopg.Connection) -> None:
    """The seed article writes cost_cents only; cost_micros follows it exactly."""
    conn.execute(
        "insert into generations (request_id, user_id, endpoint, inputs, cost_cents, status) "
        "values ('raw-1', 1, %s, '{\"prompt\": \"x\"}', 152, 'submitted')",
        (SEEDANCE,),
    )
    assert generation(conn, "raw-1")["cost_micros"] == 1_520_000
    conn.execute("update generations set cost_cents = 200 where request_id = 'raw-1'")
    row = generation(conn, "raw-1")
    assert (row["cost_micros"], row["cost_cents"]) == (2_000_000, 200)


def test_a_million_rows_lose_no_money_to_rounding(conn: psycopg.Connection) -> None:
    """Summing micro-dollars and rounding once is exact; summing rounded cents is not."""
    rows = conn.execute(
        "select sum(m) as micros, sum(rq_micros_to_cents(m)) as cents "
        "from (select 4_999::bigint as m from generate_series(1, 1000000)) s"
    ).fetchone()
    assert rows["micros"] == 4_999_000_000  # $4,999.00 really spent
    assert rows["cents"] == 0  # what per-row cents would have reported
