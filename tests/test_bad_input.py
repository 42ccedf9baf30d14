"""Bad input to the data layer: one clear error naming the field, and nothing written."""

from __future__ import annotations

import re

import psycopg
import pytest
from ledger_helpers import SEEDANCE

from renderqueue_pipeline.errors import LedgerInputError
from renderqueue_pipeline.ledger import event_from_fal_webhook, record_intent

GOOD = {"prompt": "a red fox", "duration": "5", "resolution": "720p"}

CASES = [
    ("unknown endpoint", 1, "acme/never-heard-of/t2v", GOOD, "endpoint", "no price for"),
    ("not an endpoint id", 1, "seedance", GOOD, "endpoint", "owner/app/path"),
    ("negative duration", 1, SEEDANCE, {**GOOD, "duration": "-5"}, "inputs.duration", "positive"),
    ("zero duration", 1, SEEDANCE, {**GOOD, "duration": 0}, "inputs.duration", "positive"),
    ("words as duration", 1, SEEDANCE, {**GOOD, "duration": "five"}, "inputs.duration", "seconds"),
    ("missing prompt", 1, SEEDANCE, {"duration": "5"}, "inputs.prompt", "missing or empty"),
    ("blank prompt", 1, SEEDANCE, {**GOOD, "prompt": "   "}, "inputs.prompt", "missing or empty"),
    ("unpriced resolution", 1, SEEDANCE, {**GOOD, "resolution": "8k"}, "inputs.resolution", "480p"),
    (
        "audio not a bool",
        1,
        SEEDANCE,
        {**GOOD, "generate_audio": "yes"},
        "inputs.generate_audio",
        "",
    ),
    ("negative user", -1, SEEDANCE, GOOD, "user_id", "between"),
    ("user as text", "7", SEEDANCE, GOOD, "user_id", "integer"),
    ("inputs not an object", 1, SEEDANCE, ["prompt"], "inputs", "JSON object"),
]


@pytest.mark.parametrize(
    ("user_id", "endpoint", "inputs", "field", "says"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_rejected_with_its_field_and_nothing_written(
    conn: psycopg.Connection, ledger_url: str, user_id, endpoint, inputs, field: str, says: str
) -> None:
    with pytest.raises(LedgerInputError) as caught:
        record_intent(conn, user_id=user_id, endpoint=endpoint, inputs=inputs, line_no=12)
    assert caught.value.field == field
    assert says in str(caught.value)
    assert str(caught.value).startswith(f"row 12: {field}: ")
    # the caller carries on and commits: still nothing of the rejected row lands (read from
    # another session, not after a rollback of our own that would hide any write)
    conn.commit()
    with psycopg.connect(ledger_url) as other:
        counts = other.execute(
            "select (select count(*) from batch_items) + (select count(*) from generations)"
        ).fetchone()
    assert counts[0] == 0


def test_unknown_endpoint_lists_the_priced_ones(conn: psycopg.Connection) -> None:
    with pytest.raises(LedgerInputError, match=re.escape("fal-ai/veo3.1")):
        record_intent(conn, user_id=1, endpoint="acme/x/y", inputs=GOOD)


@pytest.mark.parametrize(
    ("body", "field"),
    [({"status": "OK"}, "request_id"), ({"request_id": "r", "status": "MAYBE"}, "status")],
)
def test_malformed_webhook_bodies(body: dict, field: str) -> None:
    with pytest.raises(LedgerInputError) as caught:
        event_from_fal_webhook(body)
    assert caught.value.field == field
