"""Money: estimates at submit, the cost at completion, micro-dollar exact.

Every expected figure is computed here from the published prices (shared/fal-wire.md and
docs/ledger.md "Money"), never copied from the seeded rows.
"""

from __future__ import annotations

import uuid
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

import psycopg
import pytest
from ledger_helpers import (
    DOCUMENTED_OUTPUT_FIELDS,
    DOCUMENTED_VIDEO_FIELDS,
    SEEDANCE,
    generation,
    submit_row,
    video_payload,
)
from psycopg.types.json import Jsonb

from renderqueue_pipeline.ledger import LedgerEvent, estimate_cost, record_event
from renderqueue_pipeline.ledger.report import ledger_status
from renderqueue_pipeline.money import dollars

MICROS = 1_000_000
FAST = "bytedance/seedance-2.0/fast/text-to-video"
ARTICLE = "fal-ai/seedance-2.0/text-to-video"
VEO = "fal-ai/veo3.1"
KLING_T2V = "fal-ai/kling-video/v3/turbo/pro/text-to-video"
KLING_I2V = "fal-ai/kling-video/v2.5-turbo/pro/image-to-video"


def micros_half_up(value: Fraction | Decimal | int) -> int:
    """Round to the micro-dollar, half up (what the ledger promises)."""
    exact = Fraction(value)
    quotient = Decimal(exact.numerator) / Decimal(exact.denominator)
    return int(quotient.quantize(Decimal(1), ROUND_HALF_UP))


def seedance_tokens_per_second(width: int, height: int) -> Fraction:
    """fal's Seedance 2.0 formula: tokens = h x w x seconds x 24 / 1024."""
    return Fraction(width * height * 24, 1024)


TOKEN_PRICE = Fraction("0.014") / 1000 * MICROS  # $0.014 per 1k tokens, in micro-dollars
STANDARD_720P = Fraction("0.3034") * MICROS  # published per-second price at 720p
FAST_720P = Fraction("0.2419") * MICROS
RESOLUTIONS = {"480p": (854, 480), "720p": (1280, 720), "1080p": (1920, 1080)}


def seedance_standard(resolution: str) -> Fraction:
    if resolution == "720p":
        return STANDARD_720P  # the published figure wins over the formula's $0.3024
    return seedance_tokens_per_second(*RESOLUTIONS[resolution]) * TOKEN_PRICE


def seedance_fast(resolution: str) -> Fraction:
    """The published 720p price scaled by the token ratio (docs/ledger.md, "Money")."""
    ratio = seedance_tokens_per_second(*RESOLUTIONS[resolution]) / seedance_tokens_per_second(
        *RESOLUTIONS["720p"]
    )
    return FAST_720P * ratio


# (endpoint, resolution, with_audio) -> (micro-dollars a second, base micro-dollars,
# base seconds), from the published table; the per-second price is rounded half up to the
# micro-dollar as it is stored.
PUBLISHED: dict[tuple[str, str | None, bool | None], tuple[int, int, int]] = {
    **{(SEEDANCE, r, None): (micros_half_up(seedance_standard(r)), 0, 0) for r in RESOLUTIONS},
    **{(ARTICLE, r, None): (micros_half_up(seedance_standard(r)), 0, 0) for r in RESOLUTIONS},
    **{(FAST, r, None): (micros_half_up(seedance_fast(r)), 0, 0) for r in RESOLUTIONS},
    (VEO, "720p", False): (micros_half_up(Fraction("0.20") * MICROS), 0, 0),
    (VEO, "720p", True): (micros_half_up(Fraction("0.40") * MICROS), 0, 0),
    (VEO, "1080p", False): (micros_half_up(Fraction("0.20") * MICROS), 0, 0),
    (VEO, "1080p", True): (micros_half_up(Fraction("0.40") * MICROS), 0, 0),
    (VEO, "4k", False): (micros_half_up(Fraction("0.40") * MICROS), 0, 0),
    (VEO, "4k", True): (micros_half_up(Fraction("0.60") * MICROS), 0, 0),
    (KLING_T2V, None, None): (micros_half_up(Fraction("0.14") * MICROS), 0, 0),
    (KLING_I2V, None, None): (micros_half_up(Fraction("0.07") * MICROS), 350_000, 5),
}


def expected_cost(key: tuple[str, str | None, bool | None], seconds: Decimal) -> int:
    """cost = base + round_half_up(max(seconds - base_seconds, 0) x price per second)."""
    per_second, base, base_seconds = PUBLISHED[key]
    return base + micros_half_up(Fraction(max(seconds - base_seconds, 0)) * per_second)


def inputs_for(row: dict[str, Any], duration: str) -> dict[str, Any]:
    inputs: dict[str, Any] = {"prompt": "p", "duration": duration}
    if row["resolution"] is not None:
        inputs["resolution"] = row["resolution"]
    if row["with_audio"] is not None:
        inputs["generate_audio"] = row["with_audio"]
    return inputs


def test_the_fast_480p_row_is_the_token_ratio_rounded_to_the_micro_dollar() -> None:
    exact = seedance_fast("480p")
    assert Decimal(exact.numerator) / Decimal(exact.denominator) == pytest.approx(
        Decimal("107595.10"), abs=Decimal("0.01")
    )
    assert PUBLISHED[(FAST, "480p", None)][0] == 107_595


@pytest.mark.parametrize("duration", ["5", "4.5", "13"])
def test_every_seeded_price_row_prices_as_published(
    conn: psycopg.Connection, duration: str
) -> None:
    rows = conn.execute("select * from prices order by id").fetchall()
    keys = {(r["endpoint"], r["resolution"], r["with_audio"]) for r in rows}
    assert keys == set(PUBLISHED), "a seeded row has no published figure here, or vice versa"
    for row in rows:
        key = (row["endpoint"], row["resolution"], row["with_audio"])
        assert (row["micros_per_second"], row["base_micros"], row["base_seconds"]) == (
            PUBLISHED[key]
        ), key
        estimate = estimate_cost(conn, row["endpoint"], inputs_for(row, duration))
        assert estimate.price_id == row["id"], key
        assert estimate.cost_micros == expected_cost(key, Decimal(duration)), key


def test_half_a_micro_dollar_rounds_up(conn: psycopg.Connection) -> None:
    key = (SEEDANCE, "480p", None)
    exact = Fraction(9, 2) * PUBLISHED[key][0]  # 4.5 s x 134,505 = 605,272.5
    assert exact.denominator == 2
    estimate = estimate_cost(
        conn, SEEDANCE, {"prompt": "p", "duration": "4.5", "resolution": "480p"}
    )
    assert estimate.cost_micros == int(exact) + 1 == expected_cost(key, Decimal("4.5"))


@pytest.mark.parametrize(
    ("endpoint", "inputs", "key", "seconds"),
    [
        (SEEDANCE, {"prompt": "p", "duration": "5"}, (SEEDANCE, "720p", None), 5),  # default 720p
        (SEEDANCE, {"prompt": "p", "duration": "auto"}, (SEEDANCE, "720p", None), 15),
        (SEEDANCE, {"prompt": "p"}, (SEEDANCE, "720p", None), 15),
        (VEO, {"prompt": "p", "duration": "8s"}, (VEO, "720p", True), 8),  # audio on by default
        (VEO, {"prompt": "p", "resolution": "4k"}, (VEO, "4k", True), 8),
        (KLING_T2V, {"prompt": "p"}, (KLING_T2V, None, None), 5),
        (KLING_I2V, {"prompt": "p", "duration": 3}, (KLING_I2V, None, None), 3),  # the base
    ],
)
def test_defaults_fill_in_what_the_request_leaves_out(
    conn: psycopg.Connection, endpoint: str, inputs: dict, key: tuple, seconds: int
) -> None:
    estimate = estimate_cost(conn, endpoint, inputs)
    assert estimate.cost_micros == expected_cost(key, Decimal(seconds))
    assert estimate.seconds == seconds


def test_submit_records_the_estimate_and_its_price(conn: psycopg.Connection) -> None:
    request_id, intent = submit_row(conn)  # 5 s at 720p
    row = generation(conn, request_id)
    micros = expected_cost((SEEDANCE, "720p", None), Decimal(5))
    assert (row["cost_micros"], row["cost_cents"], row["cost_basis"]) == (
        micros,
        int(Decimal(micros) / 10_000 + Decimal("0.5")),
        "estimate",
    )
    assert row["price_id"] == intent.estimate.price_id
    assert row["billed_seconds"] == Decimal(5)


@pytest.mark.parametrize(("duration", "seconds"), [("auto", 15), ("7", 7)])
def test_a_completion_is_priced_from_the_requested_seconds(
    conn: psycopg.Connection, duration: str, seconds: int
) -> None:
    """fal documents no duration in Seedance's output: the requested (or default) seconds."""
    request_id, _ = submit_row(
        conn, inputs={"prompt": "fox", "duration": duration, "resolution": "1080p"}
    )
    record_event(conn, LedgerEvent(request_id, "completed", video_payload()))
    row = generation(conn, request_id)
    assert (row["cost_micros"], row["cost_basis"], row["billed_seconds"]) == (
        expected_cost((SEEDANCE, "1080p", None), Decimal(seconds)),
        "requested",
        seconds,
    )


UNDOCUMENTED = [
    {"video": {"duration": 5.04}},
    {"video": {"width": 1920, "height": 1080, "fps": 24}},
    {"duration": 9.5},
    {"timings": {"inference": 31.2}, "has_nsfw_concepts": [False]},
    {"video": {"duration": 3, "width": 1}, "duration": 3, "billed_seconds": 3},
]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = {**base}
    for key, value in extra.items():
        merged[key] = (
            {**merged[key], **value} if isinstance(value, dict) and key in merged else value
        )
    return merged


@pytest.mark.parametrize("extra", UNDOCUMENTED, ids=lambda e: ",".join(sorted(e)))
def test_the_ledger_reads_no_output_field_fal_does_not_document(
    conn: psycopg.Connection, extra: dict[str, Any]
) -> None:
    """Undocumented fields in a completion change nothing in the money; `outputs` keeps
    fal's payload as sent, extras included (provenance)."""
    documented = video_payload(seed=42, url="https://v3.fal.media/files/b/x/output.mp4")
    assert set(documented) == DOCUMENTED_OUTPUT_FIELDS
    assert set(documented["video"]) == DOCUMENTED_VIDEO_FIELDS
    rows, payloads = [], (documented, _merge(documented, extra))
    for payload in payloads:
        request_id, _ = submit_row(
            conn, inputs={"prompt": "fox", "duration": "auto", "resolution": "720p"}
        )
        record_event(conn, LedgerEvent(request_id, "completed", payload))
        row = generation(conn, request_id)
        rows.append(
            {
                k: row[k]
                for k in ("status", "cost_micros", "cost_basis", "billed_seconds", "outputs")
            }
        )
    assert [row.pop("outputs") for row in rows] == list(payloads)
    assert rows[1] == rows[0]
    assert rows[0]["cost_micros"] == expected_cost((SEEDANCE, "720p", None), Decimal(15))


def test_a_documented_output_duration_is_priced_as_computed(conn: psycopg.Connection) -> None:
    """Data-driven: an endpoint whose price row says where its output states its length."""
    endpoint = f"acme/documented-{uuid.uuid4().hex[:8]}/t2v"
    with conn.transaction(force_rollback=True):
        conn.execute(
            "insert into prices (endpoint, micros_per_second, default_seconds, "
            "output_seconds_path, effective_from, price_version, source) "
            "values (%s, 100000, 10, '{video,duration}', '2026-01-01', 'test', 'test')",
            (endpoint,),
        )
        request_id, _ = submit_row(conn, endpoint=endpoint, inputs={"prompt": "p"})
        payload = video_payload()
        payload["video"]["duration"] = 4.25
        record_event(conn, LedgerEvent(request_id, "completed", payload))
        row = generation(conn, request_id)
        assert (row["cost_micros"], row["cost_basis"], row["billed_seconds"]) == (
            micros_half_up(Fraction("4.25") * 100_000),
            "computed",
            Decimal("4.25"),
        )


def test_a_price_change_between_submit_and_completion_keeps_the_submit_price(
    conn: psycopg.Connection,
) -> None:
    """The row in force at created_at prices the generation, also at completion."""
    with conn.transaction(force_rollback=True):
        request_id, _ = submit_row(conn)  # 5 s at 720p
        conn.execute(
            "update generations set created_at = now() - interval '1 hour' where request_id = %s",
            (request_id,),
        )
        conn.execute(
            "insert into prices (endpoint, resolution, micros_per_second, default_seconds, "
            "default_resolution, effective_from, price_version, source) "
            "values (%s, '720p', 999999, 15, '720p', now() - interval '30 minutes', "
            "'later', 'a price rise')",
            (SEEDANCE,),
        )
        assert estimate_cost(conn, SEEDANCE, {"prompt": "p", "duration": "5"}).cost_micros == (
            5 * 999_999
        )  # a new request is priced at the new row
        record_event(conn, LedgerEvent(request_id, "completed", video_payload()))
        row = generation(conn, request_id)
        assert row["cost_micros"] == expected_cost((SEEDANCE, "720p", None), Decimal(5))
        assert row["cost_basis"] == "requested"


@pytest.mark.parametrize("kind", ["failed", "canceled"])
def test_failed_and_canceled_cost_nothing(conn: psycopg.Connection, kind: str) -> None:
    request_id, _ = submit_row(conn)
    record_event(
        conn, LedgerEvent(request_id, kind, {"detail": "nope"}, "Invalid status code: 422")
    )
    row = generation(conn, request_id)
    assert (row["status"], row["cost_micros"], row["cost_cents"], row["cost_basis"]) == (
        kind,
        0,
        0,
        "none",
    )


@pytest.mark.parametrize(
    "micros", [0, 4_999, 5_000, 14_999, 15_000, 25_000, 1_517_000, 1_234_567_895_000]
)
def test_cost_cents_is_micros_rounded_half_up(conn: psycopg.Connection, micros: int) -> None:
    request_id, _ = submit_row(conn)
    conn.execute(
        "update generations set cost_micros = %s where request_id = %s", (micros, request_id)
    )
    cents = int((Decimal(micros) / 10_000).quantize(Decimal(1), ROUND_HALF_UP))
    assert generation(conn, request_id)["cost_cents"] == cents
    conn.rollback()


def test_a_raw_cost_cents_write_keeps_micros_consistent(conn: psycopg.Connection) -> None:
    """The seed article writes cost_cents only; cost_micros follows it exactly."""
    conn.execute(
        "insert into generations (request_id, user_id, endpoint, inputs, cost_cents, status) "
        "values ('raw-1', 1, %s, '{\"prompt\": \"x\"}', 152, 'submitted')",
        (SEEDANCE,),
    )
    assert generation(conn, "raw-1")["cost_micros"] == 152 * 10_000
    conn.execute("update generations set cost_cents = 200 where request_id = 'raw-1'")
    row = generation(conn, "raw-1")
    assert (row["cost_micros"], row["cost_cents"]) == (200 * 10_000, 200)


def test_the_spend_report_sums_micro_dollars_and_loses_no_money(
    conn: psycopg.Connection,
) -> None:
    """Many rows at $0.004999: the report (ledger_status) says $49.99, not the 0 cents of
    summing per-row cents."""
    endpoint = f"acme/rounding-{uuid.uuid4().hex[:8]}/t2v"
    count, each = 10_000, 4_999
    conn.execute(
        "insert into generations (request_id, user_id, endpoint, inputs, cost_micros) "
        "select %s || n, 1, %s, %s, %s from generate_series(1, %s) n",
        (f"{endpoint}:", endpoint, Jsonb({"prompt": "p"}), each, count),
    )
    conn.commit()
    cents = conn.execute(
        "select sum(cost_cents) as cents from generations where endpoint = %s", (endpoint,)
    ).fetchone()["cents"]
    assert cents == 0  # what per-row cents would have reported
    report = {r["endpoint"]: r for r in ledger_status(conn)["by_endpoint"]}
    assert (report[endpoint]["generations"], report[endpoint]["cost_micros"]) == (
        count,
        count * each,
    )
    assert dollars(report[endpoint]["cost_micros"]) == "$49.990000"
