"""Every statement of the seed article runs unchanged and gives the article's answers."""

from __future__ import annotations

import json

import psycopg
from ledger_helpers import generation

ENDPOINT = "fal-ai/seedance-2.0/text-to-video"

# The article's SQL with $n placeholders turned into psycopg's %s, otherwise verbatim.
SUBMIT = """insert into generations
 (request_id, user_id, endpoint, inputs, cost_cents, status)
 values (%s, %s, %s, %s, %s, 'submitted')
 on conflict (request_id) do nothing"""
WEBHOOK = """update generations
 set status = %s, outputs = %s,
 error = %s, finished_at = now()
 where request_id = %s"""
RECONCILE = """select request_id, endpoint from generations
 where status = 'submitted'
 and created_at < now() - interval '10 minutes'
 limit 100"""


def test_submit_webhook_and_reconcile_statements(conn: psycopg.Connection) -> None:
    inputs = json.dumps({"prompt": "a horse", "resolution": "1080p", "duration": 5})
    conn.execute(SUBMIT, ("req-a", 42, ENDPOINT, inputs, 340))
    conn.execute(SUBMIT, ("req-a", 42, ENDPOINT, inputs, 340))  # webhook-beat-insert case: no-op
    assert (
        conn.execute("select count(*) as n from generations where request_id = 'req-a'").fetchone()[
            "n"
        ]
        == 1
    )
    # the stuck one belongs to another user: backdating it never moves user 42's month
    conn.execute(SUBMIT, ("req-b", 43, ENDPOINT, inputs, 340))
    conn.execute(
        "update generations set created_at = now() - interval '11 minutes' "
        "where request_id = 'req-b'"
    )
    conn.execute(SUBMIT, ("req-c", 42, ENDPOINT, inputs, 340))
    conn.commit()
    outputs = json.dumps({"video_url": "s3://ours/a.mp4", "original_url": "https://x/a.mp4"})
    conn.execute(WEBHOOK, ("completed", outputs, None, "req-a"))
    conn.commit()
    first = generation(conn, "req-a")
    conn.execute(WEBHOOK, ("completed", outputs, None, "req-a"))  # a retried webhook: no-op
    conn.commit()
    retried = generation(conn, "req-a")
    assert {k: v for k, v in retried.items() if k != "updated_at"} == {
        k: v for k, v in first.items() if k != "updated_at"
    }
    stuck = conn.execute(RECONCILE).fetchall()
    assert [r["request_id"] for r in stuck] == ["req-b"]
    assert (retried["status"], retried["cost_cents"], retried["cost_micros"]) == (
        "completed",
        340,
        340 * 10_000,
    )
    spent = conn.execute(
        "select sum(cost_cents) as cents from generations "
        "where user_id = 42 and created_at >= date_trunc('month', now())"
    ).fetchone()
    assert spent["cents"] == 2 * 340  # req-a and req-c, created in this transaction's month


def test_prompt_containment_search_uses_the_gin_index(conn: psycopg.Connection) -> None:
    conn.execute(SUBMIT, ("req-c", 1, ENDPOINT, json.dumps({"prompt": "fox"}), 0))
    found = conn.execute(
        "select request_id from generations where inputs @> %s", (json.dumps({"prompt": "fox"}),)
    ).fetchall()
    assert [r["request_id"] for r in found] == ["req-c"]
    conn.execute("set enable_seqscan = off")
    plan = " ".join(
        r["QUERY PLAN"]
        for r in conn.execute(
            'explain select id from generations where inputs @> \'{"prompt": "fox"}\''
        )
    )
    assert "generations_inputs_gin_idx" in plan
    conn.rollback()


def test_a_raw_completion_of_a_row_with_no_cost_is_priced(conn: psycopg.Connection) -> None:
    """The article's own webhook statement, verbatim, on rows inserted with no estimate:
    the guard prices the completion as the state machine would (1080p at $0.6804/s, the
    requested 5 s; "auto" at the endpoint's default 720p and 15 s)."""
    five = json.dumps({"prompt": "a horse", "resolution": "1080p", "duration": 5})
    auto = json.dumps({"prompt": "a horse", "duration": "auto"})
    conn.execute(SUBMIT, ("req-5s", 42, ENDPOINT, five, 0))
    conn.execute(SUBMIT, ("req-auto", 42, ENDPOINT, auto, 0))
    conn.execute(SUBMIT, ("req-failed", 42, ENDPOINT, five, 0))
    conn.commit()
    assert generation(conn, "req-5s")["cost_basis"] == "none"
    outputs = json.dumps(
        {"video_url": "s3://ours/a.mp4", "original_url": "https://x/a.mp4", "duration": 5}
    )
    conn.execute(WEBHOOK, ("completed", outputs, None, "req-5s"))
    conn.execute(WEBHOOK, ("completed", outputs, None, "req-auto"))
    conn.execute(WEBHOOK, ("failed", None, "boom", "req-failed"))
    conn.commit()
    five_s, auto_s, failed = (generation(conn, r) for r in ("req-5s", "req-auto", "req-failed"))
    assert (five_s["cost_micros"], five_s["cost_cents"], five_s["cost_basis"]) == (
        5 * 680_400,
        340,
        "requested",
    )
    assert five_s["billed_seconds"] == 5
    assert five_s["price_id"] is not None
    assert (auto_s["cost_micros"], auto_s["cost_basis"], auto_s["billed_seconds"]) == (
        15 * 303_400,
        "requested",
        15,
    )
    assert (failed["cost_micros"], failed["cost_basis"]) == (0, "none")
    # a retried delivery of the same statement changes nothing
    conn.execute(WEBHOOK, ("completed", outputs, None, "req-5s"))
    conn.commit()
    assert generation(conn, "req-5s")["cost_micros"] == 5 * 680_400
