"""Budget alerts fire once per user, month and threshold, through a real loopback receiver.

The ledger clock is pinned (`renderqueue.now`) to the middle of November 2026, so the
month evaluated never depends on the wall clock.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from datetime import date

import dagster as dg
import psycopg
import pytest
from alert_helpers import TOKEN_PATH, alert_receiver
from batch_helpers import dagster_instance
from click.testing import CliRunner
from report_helpers import add_generation, utc

from renderqueue_pipeline.alerts import evaluate_budget_alerts, set_alert_percents
from renderqueue_pipeline.batch import set_budget
from renderqueue_pipeline.cli import main
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.defs.alerts.resources import AlertsResource
from renderqueue_pipeline.defs.alerts.sensors import budget_alert_sensor, run_failure_alert_sensor
from renderqueue_pipeline.defs.ledger.jobs import ledger_status_job
from renderqueue_pipeline.defs.resources import LedgerDatabase
from renderqueue_pipeline.settings import ConfigError, load_settings

NOW = "2026-11-15T12:00:00Z"
MONTH = date(2026, 11, 1)
USD = 1_000_000


def clocked(url: str, now: str = NOW) -> psycopg.Connection:
    """A ledger connection whose rq_now() is `now`."""
    connection = connect(url, autocommit=True)
    connection.execute("select set_config('renderqueue.now', %s, false)", (now,))
    return connection


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[psycopg.Connection]:
    connection = clocked(ledger_url)
    try:
        yield connection
    finally:
        connection.close()


def spend(conn: psycopg.Connection, user_id: int, micros: int, status: str = "completed") -> None:
    add_generation(
        conn, created_at=utc(2026, 11, 10, 9), status=status, user_id=user_id, cost_micros=micros
    )


def alert_rows(conn: psycopg.Connection) -> list[dict]:
    return list(
        conn.execute(
            "select user_id, month, threshold_percent, attempts, last_error, delivered_at,"
            " next_attempt_at from budget_alerts order by user_id, threshold_percent"
        )
    )


def evaluate(url: str, receiver_url: str | None, **kwargs):
    with clocked(url, kwargs.pop("now", NOW)) as conn:
        kwargs.setdefault("default_limit", None)  # RENDERQUEUE_DEFAULT_MONTHLY_BUDGET_USD unset
        return evaluate_budget_alerts(
            conn, url=receiver_url, default_percents=(50, 80, 100), wait_s=0, **kwargs
        )


def test_each_threshold_is_sent_once_across_two_processes_and_a_restart(
    ledger: psycopg.Connection, ledger_url: str
) -> None:
    set_budget(ledger, 7, 10 * USD, MONTH)
    spend(ledger, 7, 6 * USD)
    spend(ledger, 7, int(2.5 * USD), status="in_progress")  # in flight counts: 85%
    # a slow receiver keeps the first evaluation's post open while the second one runs
    with alert_receiver(delay_s=0.3) as receiver:
        start = threading.Barrier(2)
        runs = []

        def worker() -> None:
            start.wait()
            runs.append(evaluate(ledger_url, receiver.url))

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(runs) == 2
        assert sorted(o.threshold_percent for r in runs for o in r.sent) == [50, 80]
        assert sorted(b["text"].split(" reached ")[1][:3] for b in receiver.accepted) == [
            "50%",
            "80%",
        ]
        # a restart: a fresh evaluation after the first ones finished sends nothing again
        again = evaluate(ledger_url, receiver.url)
        assert again.sent == []
        assert again.recorded == []
        assert len(receiver.requests) == 2

        spend(ledger, 7, 2 * USD)  # 105%: only the 100% threshold is new
        assert [o.threshold_percent for o in evaluate(ledger_url, receiver.url).sent] == [100]
        assert evaluate(ledger_url, receiver.url).sent == []
        assert len(receiver.requests) == 3

    body = receiver.accepted[-1]
    assert body["text"] == (
        "Budget alert: user 7 reached 100% of the 2026-11 budget: $10.50 of $10.00 "
        "(105.0%; spent $8.00 + in flight $2.50)"
    )
    fields = {f["title"]: f["value"] for f in body["attachments"][0]["fields"]}
    assert fields["Budget"] == "$10.00"
    assert fields["Spent + in flight"] == "$10.50"
    rows = alert_rows(ledger)
    assert [(r["threshold_percent"], r["attempts"]) for r in rows] == [(50, 1), (80, 1), (100, 1)]
    assert all(r["delivered_at"] is not None for r in rows)


def test_a_failed_delivery_is_retried_with_backoff_and_delivered_later(
    ledger: psycopg.Connection, ledger_url: str
) -> None:
    set_budget(ledger, 7, 10 * USD, MONTH)
    spend(ledger, 7, 5 * USD)
    with alert_receiver(statuses=[500, 500, 500]) as receiver:
        first = evaluate(ledger_url, receiver.url)
        assert first.sent == []
        assert len(first.failed) == 1
        [row] = alert_rows(ledger)
        assert row["attempts"] == 3
        assert row["delivered_at"] is None
        assert row["last_error"] == f"{receiver.url.split('/services')[0]}/… answered HTTP 500"
        assert (row["next_attempt_at"] - utc(2026, 11, 15, 12)).total_seconds() == 60
        assert "not delivered user 7 50% after 3 attempts" in first.summary()

        # not due yet: a second tick a moment later leaves it alone
        assert evaluate(ledger_url, receiver.url, now="2026-11-15T12:00:30Z").outcomes == []
        assert len(receiver.requests) == 3

        later = evaluate(ledger_url, receiver.url, now="2026-11-15T12:02:00Z")
        assert [o.threshold_percent for o in later.sent] == [50]
    assert len(receiver.accepted) == 1
    assert len(receiver.requests) == 4
    [row] = alert_rows(ledger)
    assert row["attempts"] == 4
    assert row["delivered_at"] == utc(2026, 11, 15, 12, 2)


def test_a_receiver_that_is_down_is_recorded_without_the_webhook_token(
    ledger: psycopg.Connection, ledger_url: str
) -> None:
    set_budget(ledger, 7, 10 * USD, MONTH)
    spend(ledger, 7, 9 * USD)
    with socket.socket() as probe:  # a free loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = f"http://127.0.0.1:{port}{TOKEN_PATH}"
    run = evaluate(ledger_url, down)
    # the first post fails 3 times; the second alert waits for the next evaluation
    assert len(run.failed) == 1
    assert run.sent == []
    rows = alert_rows(ledger)
    assert [r["attempts"] for r in rows] == [3, 0]
    assert all(r["delivered_at"] is None for r in rows)
    for text in [rows[0]["last_error"], run.summary()]:
        assert "s3cr3tT0k3n" not in text
        assert "/services" not in text
    assert rows[0]["last_error"].startswith(f"ConnectError posting to http://127.0.0.1:{port}/…")

    with alert_receiver() as receiver:  # back up, a retry later: both delivered once
        later = evaluate(ledger_url, receiver.url, now="2026-11-15T13:00:00Z")
    assert sorted(o.threshold_percent for o in later.sent) == [50, 80]
    assert len(receiver.requests) == 2


def test_users_without_a_budget_are_skipped(ledger: psycopg.Connection, ledger_url: str) -> None:
    spend(ledger, 8, 50 * USD)  # no budget row, no default: never alerted
    set_budget(ledger, 9, 0, date(2026, 10, 1))  # a budget for another month only
    spend(ledger, 9, 50 * USD)
    with alert_receiver() as receiver:
        run = evaluate(ledger_url, receiver.url, default_limit=None)
        assert run.users_checked == 0
        assert run.recorded == []
        assert receiver.requests == []
        # with a default budget, the same users are checked against it
        run = evaluate(ledger_url, receiver.url, default_limit=40 * USD)
    assert run.users_checked == 2
    assert sorted((o.user_id, o.threshold_percent) for o in run.sent) == [
        (8, 50),
        (8, 80),
        (8, 100),
        (9, 50),
        (9, 80),
        (9, 100),
    ]
    assert "of the 2026-11 default budget" in receiver.texts()[0]


def test_per_user_alert_percents_replace_the_defaults(
    ledger: psycopg.Connection, ledger_url: str
) -> None:
    set_budget(ledger, 7, 10 * USD, MONTH)
    assert set_alert_percents(ledger, 7, MONTH, (90,))["alert_percents"] == [90]
    set_budget(ledger, 8, 10 * USD, MONTH)  # keeps the defaults
    spend(ledger, 7, int(8.5 * USD))
    spend(ledger, 8, int(8.5 * USD))
    with alert_receiver() as receiver:
        run = evaluate(ledger_url, receiver.url)
        assert sorted((o.user_id, o.threshold_percent) for o in run.sent) == [(8, 50), (8, 80)]
        spend(ledger, 7, 1 * USD)  # 95%
        run = evaluate(ledger_url, receiver.url)
    assert [(o.user_id, o.threshold_percent) for o in run.sent] == [(7, 90)]
    assert set_alert_percents(ledger, 7, date(2026, 12, 1), (50,)) is None  # no budget there


def test_the_cli_sets_alert_percents_and_prints_what_it_sent(
    ledger: psycopg.Connection,
    ledger_env: str,
    monkeypatch: pytest.MonkeyPatch,
    settings_env: Callable[..., None],
) -> None:

    monkeypatch.setenv("PGOPTIONS", f"-c renderqueue.now={NOW}")
    monkeypatch.setenv("RENDERQUEUE_BUDGET_ALERT_PERCENTS", "25,75")
    spend(ledger, 7, 6 * USD)
    runner = CliRunner()
    result = runner.invoke(main, ["budget", "set", "--user-id", "7", "--alerts", "50,90"])
    assert result.exit_code != 0, result.output
    assert "has no budget for 2026-11" in result.output, result.output
    result = runner.invoke(
        main, ["budget", "set", "--user-id", "7", "--usd", "10", "--alerts", "50,90"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "user 7: $10.00 for 2026-11",
        "user 7: alerts at 50,90 % for 2026-11",
    ]
    with alert_receiver() as receiver:
        settings_env(RENDERQUEUE_ALERT_WEBHOOK_URL=receiver.url)
        result = runner.invoke(main, ["budget", "alerts"])
        assert result.exit_code == 0, result.output
        assert result.output.splitlines()[0] == (
            "sent: Budget alert: user 7 reached 50% of the 2026-11 budget: $6.00 of $10.00 "
            "(60.0%; spent $6.00 + in flight $0.00)"
        )
        assert runner.invoke(main, ["budget", "alerts"]).output.endswith(
            "no new threshold crossed\n"
        )
    assert len(receiver.requests) == 1


def test_a_bad_alert_webhook_url_is_named_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RENDERQUEUE_ALERT_WEBHOOK_URL", f"hooks.example{TOKEN_PATH}")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert str(raised.value) == (
        "RENDERQUEUE_ALERT_WEBHOOK_URL: expected an http(s):// URL (got '<redacted>')"
    )
    monkeypatch.setenv("RENDERQUEUE_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/x")
    monkeypatch.setenv("RENDERQUEUE_BUDGET_ALERT_PERCENTS", "50,0")
    with pytest.raises(ConfigError, match="RENDERQUEUE_BUDGET_ALERT_PERCENTS: expected whole"):
        load_settings()


def test_the_budget_alert_sensor_sends_once_on_a_real_instance(
    ledger: psycopg.Connection,
    ledger_env: str,
    dagster_storage: str,
    monkeypatch: pytest.MonkeyPatch,
    settings_env: Callable[..., None],
) -> None:

    monkeypatch.setenv("PGOPTIONS", f"-c renderqueue.now={NOW}")
    set_budget(ledger, 7, 10 * USD, MONTH)
    spend(ledger, 7, 5 * USD)
    with alert_receiver() as receiver, dagster_instance(dagster_storage) as instance:
        settings_env(RENDERQUEUE_ALERT_WEBHOOK_URL=receiver.url)
        resources = {
            "ledger": LedgerDatabase(url=ledger_env),
            "alerts": AlertsResource.from_settings(load_settings()),
        }
        first = budget_alert_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        second = budget_alert_sensor(
            dg.build_sensor_context(instance=instance, resources=resources)
        )
    assert isinstance(first, dg.SkipReason)
    assert first.skip_message == "2026-11: 1 users with a budget checked; sent user 7 50%"
    assert second.skip_message == "2026-11: 1 users with a budget checked; no new threshold crossed"
    assert len(receiver.requests) == 1


def test_a_failed_run_of_our_job_is_posted_to_the_alert_webhook(
    ledger_env: str, dagster_storage: str, settings_env: Callable[..., None]
) -> None:

    with socket.socket() as probe:  # a database nobody serves: the run fails for real
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with alert_receiver() as receiver, dagster_instance(dagster_storage) as instance:
        settings_env(RENDERQUEUE_ALERT_WEBHOOK_URL=receiver.url)
        result = ledger_status_job.execute_in_process(
            instance=instance,
            resources={"ledger": LedgerDatabase(url=f"postgresql://rq@127.0.0.1:{port}/none")},
            raise_on_error=False,
        )
        assert not result.success
        context = dg.build_run_status_sensor_context(
            sensor_name="run_failure_alert_sensor",
            dagster_instance=instance,
            dagster_run=result.dagster_run,
            dagster_event=result.get_run_failure_event(),
            resources={"alerts": AlertsResource.from_settings(load_settings())},
        ).for_run_failure()
        run_failure_alert_sensor(context)
    [body] = receiver.accepted
    assert body["text"].startswith(
        f"Dagster run failed: job ledger_status_job, run {result.run_id[:8]}: "
    )
    fields = {f["title"]: f["value"] for f in body["attachments"][0]["fields"]}
    assert fields == {"Job": "ledger_status_job", "Run": result.run_id}
