"""Monthly spend report: materializing one month of 5,000,000 generations.

A fresh ledger gets one month (October 2026) of 5,000,000 generations: 600 users, 12
endpoints, every status (completed, failed, canceled, and open ones in the month's last
hours), about 70% of them in 2,000 batches, each with its intent row in `batch_items` as
the submit path writes it. Rows are loaded in created_at order with one INSERT ... SELECT,
and the secondary indexes built afterwards (the two GIN indexes on prompts and inputs are
left out: no report reads them, and building them would only lengthen the load).

Measured, each in a fresh process (peak memory is that process's own peak RSS, VmHWM;
Postgres works within its own work_mem):
- baseline: pandas loads the month's rows (`COPY ... TO STDOUT` as CSV into `read_csv`,
  the fastest way we know to get rows into pandas) and groups them in memory by user, by
  endpoint, by batch and by day and endpoint;
- refreshing the current month (what the hourly schedule runs): the month as of its 29th
  at noon, refreshed once, then an hour of traffic (20,000 new generations and 20,000
  completions through `record_events`, in batches of 50 as the webhook receiver commits
  them), then the measured refresh, which reads from the ledger only the days that changed.
  Its ratio came within a few percent of its bar in a full run (issue 23), so three hours
  are measured, each hour's refresh followed by the pandas baseline over the same rows
  (same total, checked), and the medians compared;
- the checks (report against the ledger by user and by endpoint, prices, open rows,
  archive failures), which read the whole month: no ratio required, shown for scale;
- finalizing (what the schedule runs on the 1st): a rebuild that reads every day again;
  no ratio required, shown for scale.

The reports add no index on generations. Their one addition to the write path is the
closed-month row triggers (issue 18), whose `WHEN` clause skips every write to the
current month; the webhook figures write to the current month. (Here October 2026 has
ended by the machine's clock, so the hours of traffic are recorded as changes to a closed
month; the measured refresh is not a rebuild, as `now` is set to the 29th.)
"""

from __future__ import annotations

import io
import time
from datetime import UTC, date, datetime, timedelta

import pandas as pd
from rich.console import Console

from bench.common import REPEATS, Figure, interleaved, median, note, scaled, scratch_ledger
from bench.memory import measured
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.ledger import LedgerEvent, record_events
from renderqueue_pipeline.reports import checks as report_checks
from renderqueue_pipeline.reports.spend import refresh_month

GENERATIONS = scaled(5_000_000, 100_000)
USERS = 600
BATCHES = 2_000
MONTH = date(2026, 10, 1)
OPEN_NOW = datetime(2026, 10, 29, 12, tzinfo=UTC)
FINAL_NOW = datetime(2026, 11, 1, 7, tzinfo=UTC)
EXTRA_ENDPOINTS = 7
TRAFFIC = scaled(20_000, 2_000)
MEMORY_LIMIT_MB = 300
FINALIZE_MOONSHOT_S = 10.0  # a 5,000,000-row month finalized in under 10 s


def load_month(url: str, n: int = GENERATIONS, until: datetime = OPEN_NOW) -> None:
    """One month of generations in created_at order, spread evenly up to `until`."""
    with connect(url) as conn:
        basis = "computed"
        # secondary indexes are built once after the load (much faster than row by row);
        # the two GIN indexes on prompts and inputs are left out: no report reads them
        secondary = conn.execute(
            "select i.indexname, i.indexdef from pg_indexes i"
            " where i.tablename in ('generations', 'batch_items') and not exists"
            " (select 1 from pg_constraint c where c.conindid = i.indexname::regclass)"
        ).fetchall()
        rebuilt = [r["indexdef"] for r in secondary if " gin " not in r["indexdef"].lower()]
        for r in secondary:
            conn.execute(f'drop index "{r["indexname"]}"')
        conn.execute(
            "insert into prices (endpoint, micros_per_second, default_seconds, effective_from,"
            " price_version, source) select 'bench/endpoint-' || i, 50000 * i, 5, "
            "'2026-01-01', 'bench', 'bench' from generate_series(1, %s) i",
            (EXTRA_ENDPOINTS,),
        )
        conn.execute(
            "create temp table bench_endpoints as select row_number() over (order by endpoint)"
            " - 1 as k, endpoint, (array_agg(id order by id))[1] as price_id,"
            " max(micros_per_second) as mps from prices group by endpoint"
        )
        endpoints = conn.execute("select count(*) as n from bench_endpoints").fetchone()["n"]
        conn.execute(
            "insert into batches (source, content_version, created_at) select "
            "'s3://prompts/inbox/batch-' || i || '.csv', 'v1', %s from generate_series(1, %s) i",
            (datetime(MONTH.year, MONTH.month, 1, tzinfo=UTC), BATCHES),
        )
        conn.execute("alter table generations disable trigger user")
        conn.execute("alter table batch_items disable trigger user")
        span = (until - datetime(MONTH.year, MONTH.month, 1, tzinfo=UTC)).total_seconds()
        conn.execute(
            """
            insert into batch_items (id, batch_id, idempotency_key, user_id, endpoint, inputs,
                                     state, request_id, estimate_micros, created_at)
            select i, b.batch_id, 'bench-' || i,
                   case when b.batch_id is null then 1 + (i * 7919) %% %(users)s
                        else 1 + b.batch_id %% %(users)s end,
                   e.endpoint, '{"prompt": "p", "duration": "8"}', 'submitted', 'req-' || i,
                   8 * e.mps, %(start)s + (i * %(span)s / %(n)s) * interval '1 second'
            from generate_series(1::bigint, %(n)s) i
            cross join lateral (
              select case when i %% 10 < 7 then 1 + i * %(batches)s / (%(n)s + 1) end as batch_id
            ) b
            join bench_endpoints e
              on e.k = case when b.batch_id is null then (i * 31) %% %(endpoints)s
                            else (b.batch_id + i %% 2) %% %(endpoints)s end
            order by i
            """,
            {
                "n": n,
                "users": USERS,
                "batches": BATCHES,
                "endpoints": endpoints,
                "start": datetime(MONTH.year, MONTH.month, 1, tzinfo=UTC),
                "span": span,
            },
        )
        conn.execute(
            """
            insert into generations (id, request_id, user_id, endpoint, inputs, outputs, status,
                                     cost_cents, cost_micros, cost_basis, price_id,
                                     billed_seconds, batch_item_id, created_at, finished_at,
                                     updated_at)
            select bi.id, bi.request_id, bi.user_id, bi.endpoint,
                   '{"prompt": "a slow pan over a harbour at dawn, volumetric light",
                     "duration": "8", "resolution": "720p"}',
                   case when s.status = 'completed' then jsonb_build_object(
                     'video_url', 'https://v3b.fal.media/files/b/' || md5(bi.request_id)
                                  || '/output.mp4', 'duration', s.seconds) end,
                   s.status::generation_status,
                   round(s.cost / 10000.0), s.cost,
                   case when s.status = 'completed' then %(basis)s
                        when s.status in ('submitted', 'in_progress') then 'estimate'
                        else 'none' end,
                   e.price_id, s.seconds, bi.id, bi.created_at,
                   case when s.status in ('submitted', 'in_progress') then null
                        else bi.created_at + interval '2 minutes' end,
                   bi.created_at + interval '2 minutes'
            from batch_items bi
            join bench_endpoints e on e.endpoint = bi.endpoint
            cross join lateral (
              select st.status, sec.seconds,
                     case when st.status in ('failed', 'canceled') then 0
                          else round(sec.seconds * e.mps)::bigint end as cost
              from (select case
                      when bi.created_at > %(until)s - interval '6 hours' and bi.id %% 2 = 0
                        then case when bi.id %% 4 = 0 then 'submitted' else 'in_progress' end
                      when bi.id %% 100 < 6 then 'failed'
                      when bi.id %% 100 < 9 then 'canceled'
                      else 'completed' end as status) st,
                   (select 4 + (bi.id %% 12)::numeric as seconds) sec
            ) s
            order by bi.id
            """,
            {"basis": basis, "until": until},
        )
        conn.execute("set maintenance_work_mem = '256MB'")
        for definition in rebuilt:
            conn.execute(definition)
        conn.execute("alter table generations enable trigger user")
        conn.execute("alter table batch_items enable trigger user")
        conn.execute("select setval('generations_id_seq', (select max(id) from generations))")
        conn.execute("select setval('batch_items_id_seq', (select max(id) from batch_items))")
        conn.commit()
    with connect(url, autocommit=True) as conn:
        conn.execute("vacuum analyze generations")
        conn.execute("vacuum analyze batch_items")
        conn.execute("vacuum analyze batches")


def pandas_baseline(url: str) -> dict:
    """The month's rows into pandas, grouped in memory (what a notebook would do)."""

    start = datetime(MONTH.year, MONTH.month, 1, tzinfo=UTC)
    end = datetime(2026, 11, 1, tzinfo=UTC)
    buffer = io.BytesIO()
    with connect(url) as conn, conn.cursor() as cur:
        # COPY takes no bind parameters: the two datetimes are the bench's own
        sql = (
            "copy (select g.user_id, g.endpoint, bi.batch_id, g.status, g.cost_basis,"  # noqa: S608
            " g.cost_micros, g.billed_seconds, bi.estimate_micros,"
            " (g.created_at at time zone 'UTC')::date as day"
            " from generations g left join batch_items bi on bi.id = g.batch_item_id"
            f" where g.created_at >= '{start.isoformat()}' and g.created_at < '{end.isoformat()}')"
            " to stdout (format csv, header)"
        )
        with cur.copy(sql) as copy:
            for chunk in copy:
                buffer.write(chunk)
    buffer.seek(0)
    frame = pd.read_csv(buffer, dtype={"batch_id": "Int64"})
    del buffer
    completed = frame["status"] == "completed"
    opened = frame["status"].isin(["submitted", "in_progress"])
    frame = frame.assign(
        completed=completed,
        failed=frame["status"] == "failed",
        canceled=frame["status"] == "canceled",
        open=opened,
        unpriced=completed & frame["cost_basis"].isin(["unpriced", "none"]),
        spent=frame["cost_micros"].where(completed, 0),
        seconds=frame["billed_seconds"].where(completed, 0),
        open_estimate=frame["cost_micros"].where(opened, 0),
    )
    sums = {
        "generations": ("status", "size"),
        "completed": ("completed", "sum"),
        "failed": ("failed", "sum"),
        "canceled": ("canceled", "sum"),
        "open": ("open", "sum"),
        "unpriced": ("unpriced", "sum"),
        "billed_seconds": ("seconds", "sum"),
        "cost_micros": ("spent", "sum"),
        "open_estimate_micros": ("open_estimate", "sum"),
    }
    by_user = frame.groupby("user_id").agg(**sums)
    by_endpoint = frame.groupby("endpoint").agg(**sums)
    by_batch = frame.groupby("batch_id", dropna=False).agg(
        **sums, submit_estimate_micros=("estimate_micros", "sum")
    )
    daily = frame.groupby(["day", "endpoint"]).agg(**sums)
    return {
        "cost_micros": int(by_user["cost_micros"].sum()),
        "rows": len(by_user) + len(by_endpoint) + len(by_batch) + len(daily),
    }


def ours(url: str, now: datetime, rebuild: bool = False) -> dict:
    """The asset's work: refresh (or finalize) the month's four report tables."""

    with connect(url) as conn:
        report = refresh_month(conn, MONTH, now=now, rebuild=rebuild)
    return {
        "cost_micros": report.cost_micros,
        "days_recomputed": report.days_recomputed,
        "timings": {k: round(v, 3) for k, v in report.timings.items()},
    }


def checks(url: str, now: datetime) -> dict:
    """The asset checks' work: the report against the ledger by user and by endpoint, prices,
    rows open over 24 h, archive failures."""

    timings = {}
    with connect(url) as conn:
        findings = []
        for name, call in (
            ("by_user", lambda: report_checks.report_matches_ledger(conn, MONTH, "user")),
            ("by_endpoint", lambda: report_checks.report_matches_ledger(conn, MONTH, "endpoint")),
            ("priced", lambda: report_checks.completed_generations_are_priced(conn, MONTH)),
            ("open_24h", lambda: report_checks.no_generation_open_too_long(conn, MONTH, now)),
            ("archive", lambda: report_checks.no_archive_failures(conn, MONTH)),
        ):
            started = time.perf_counter()
            findings.append(call())
            timings[name] = round(time.perf_counter() - started, 3)
    return {
        "ledger_matches": all(f.passed for f in findings[:2]),
        "priced": findings[2].passed,
        "timings": timings,
    }


def hour_of_traffic(url: str, now: datetime, tag: str = "new") -> None:
    """New generations for the current hour and completions of open ones, as the ledger
    receives them (inserts by the submit path's statement, events by record_events)."""

    with connect(url) as conn:
        rows = conn.execute(
            "select request_id from generations where status in ('submitted', 'in_progress')"
            " order by id limit %s",
            (TRAFFIC,),
        ).fetchall()
        conn.commit()  # each batch below is its own transaction, as in the receiver
        for i in range(0, len(rows), 50):  # the webhook receiver's batches are this size
            record_events(
                conn,
                [
                    LedgerEvent(
                        r["request_id"],
                        "completed",
                        {
                            "video": {
                                "url": f"https://v3b.fal.media/{r['request_id']}.mp4",
                                "duration": 6,
                            }
                        },
                    )
                    for r in rows[i : i + 50]
                ],
            )
        for first in range(1, TRAFFIC + 1, 1000):  # 1,000 rows per statement, as a batch does
            conn.execute(
                "insert into generations (request_id, user_id, endpoint, inputs, cost_micros,"
                " cost_basis, created_at) select %s || '-' || i, 1 + i %% %s,"
                " 'fal-ai/kling-video/v3/turbo/pro/text-to-video', '{\"duration\": \"5\"}',"
                " 700000, 'estimate', %s + (i * interval '0.1 second')"
                " from generate_series(%s::int, %s::int) i",
                (tag, USERS, now - timedelta(minutes=50), first, first + 999),
            )
            conn.commit()


def run(console: Console) -> list[Figure]:
    with scratch_ledger() as url:
        started = time.perf_counter()
        console.print(f"loading {GENERATIONS:,} generations for {MONTH:%Y-%m} ...")
        load_month(url)
        note(console, f"loaded in {time.perf_counter() - started:.0f} s")
        first_s, first_mb, first = measured(ours, url, OPEN_NOW)
        note(console, f"first refresh (every day): {first_s:.2f} s, {first_mb:.0f} MB {first}")
        hours = iter(range(1, REPEATS + 1))

        def refresh() -> tuple[float, float, dict]:
            """An hour of traffic (not timed), then the hourly refresh at the hour's end."""
            hour = next(hours)
            hour_of_traffic(url, OPEN_NOW + timedelta(hours=hour - 1), f"new{hour}")
            found = measured(ours, url, OPEN_NOW + timedelta(hours=hour))
            note(
                console,
                f"current month after hour {hour}: {found[0]:.2f} s, {found[1]:.0f} MB {found[2]}",
            )
            return found

        def baseline() -> tuple[float, float, dict]:
            found = measured(pandas_baseline, url)
            note(console, f"pandas: {found[0]:.2f} s, {found[1]:.0f} MB")
            return found

        refreshes, baselines = interleaved(REPEATS, refresh, baseline)
        for (_, _, current), (_, _, base) in zip(refreshes, baselines, strict=True):
            assert current["cost_micros"] == base["cost_micros"], (current, base)
        last = OPEN_NOW + timedelta(hours=REPEATS)
        check_s, check_mb, checked = measured(checks, url, last)
        note(console, f"checks: {check_s:.2f} s, {check_mb:.0f} MB {checked}")
        assert checked["ledger_matches"], checked
        assert checked["priced"], checked
        final_s, final_mb, final = measured(ours, url, FINAL_NOW, True)
        note(console, f"finalizing rebuild: {final_s:.2f} s, {final_mb:.0f} MB {final}")
        last_total = baselines[-1][2]["cost_micros"]
        assert final["cost_micros"] == last_total, (final, last_total)
    open_runs = [r[0] for r in refreshes]
    base_runs = [b[0] for b in baselines]
    base_s = median(base_runs)
    base_mb = max(b[1] for b in baselines)
    peak = max(*(r[1] for r in refreshes), check_mb, final_mb)
    return [
        Figure.of_runs(
            "refresh the current month (changed days)",
            open_runs,
            "pandas: load and group",
            base_runs,
            unit="s",
            required=10.0,
            higher_is_better=False,
        ),
        Figure(
            "finalize: rebuild every day",
            final_s,
            "pandas: load and group",
            base_s,
            unit="s",
            higher_is_better=False,
        ),
        Figure(
            "finalize: rebuild every day",
            final_s,
            f"{FINALIZE_MOONSHOT_S:.0f} s for {GENERATIONS:,} rows",
            FINALIZE_MOONSHOT_S * GENERATIONS / 5_000_000,
            unit="s",
            higher_is_better=False,
            moonshot=1.0,
        ),
        Figure(
            "checks against the ledger (whole month)",
            check_s,
            "pandas: load and group",
            base_s,
            unit="s",
            higher_is_better=False,
        ),
        Figure(
            "peak memory of the report processes",
            peak,
            f"limit {MEMORY_LIMIT_MB} MB",
            MEMORY_LIMIT_MB,
            unit="MB",
            required=1.0,
            higher_is_better=False,
        ),
        Figure(
            "peak memory of the pandas baseline",
            base_mb,
            f"limit {MEMORY_LIMIT_MB} MB",
            MEMORY_LIMIT_MB,
            unit="MB",
            higher_is_better=False,
        ),
    ]
