"""What the report checks find: each returns a Finding whose metadata says what was seen.

`report_matches_ledger` reads the report and the ledger in one snapshot and compares them
key by key (user or endpoint), exactly: EVERY key, whenever its rows were written. A check
never passes on a report that differs from the ledger. Keys with a row written after the
report's snapshot are named ("changed since the report": refresh the month), and a month
whose ledger changed after it ended says when and whether a rebuild is pending (the
reports' sensor rebuilds it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import psycopg
from psycopg import IsolationLevel

from renderqueue_pipeline.db import LedgerConnection, one_row
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.money import cents
from renderqueue_pipeline.reports.figures import BILLED, COMPARED, COMPLETED_SUMS
from renderqueue_pipeline.reports.months import month_range

# The figures a report row must share with the ledger, exactly (reports/figures.py); the
# billed ones are derived from two sums (null while no generation of the key was billed),
# every other compared figure is summed as it is.
SUMMED = (
    *(c for c in COMPARED if c not in BILLED),
    "fal_billed_sum",
    "billed_computed_micros",
)
MAX_OPEN = "24 hours"
# Writes that began this long before a report's snapshot may still have been in flight.
IN_FLIGHT_MARGIN = "5 minutes"
SAMPLE = 5
KEYS = {"user": "user_id", "endpoint": "endpoint"}


@dataclass
class Finding:
    """One check's verdict and what it saw."""

    name: str
    passed: bool
    summary: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Difference:
    key: Any
    column: str
    report: Any
    ledger: Any


@contextmanager
def snapshot(conn: LedgerConnection) -> Iterator[LedgerConnection]:
    """One read-only REPEATABLE READ transaction: every query sees the same moment."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.commit()
    previous = conn.isolation_level
    conn.isolation_level = IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            yield conn
    finally:
        conn.isolation_level = previous


def per_second(micros: int, seconds: Decimal) -> Decimal | None:
    """Micro-dollars per completed second, to 3 decimals (null without seconds)."""
    if not seconds:
        return None
    return (Decimal(int(micros)) / Decimal(seconds)).quantize(Decimal("0.001"), ROUND_HALF_UP)


def add_billed_totals(row: dict, fal_billed: int, billed_computed: int) -> None:
    """fal's total for the billed generations and its difference from our own figure for
    the same ones; both null while none was billed (the report tables' rule)."""
    billed = row["billed_generations"] > 0
    row["fal_billed_micros"] = fal_billed if billed else None
    row["billed_difference_micros"] = fal_billed - billed_computed if billed else None


def fold_facts(facts: list[dict], by: str) -> list[dict]:
    """Ledger facts (user, endpoint, status, unpriced) folded into report-shaped rows."""
    key = KEYS[by]
    rows: dict[Any, dict] = {}
    for f in facts:
        row = rows.setdefault(
            f[key],
            {key: f[key], **dict.fromkeys(SUMMED, 0), "changed_after": False},
        )
        n, status = f["generations"], f["status"]
        row["generations"] += n
        if status == "completed":
            row["completed"] += n
            row["unpriced"] += n if f["unpriced"] else 0
            for figure in COMPLETED_SUMS:  # summed as the ledger's query gives them
                row[figure] += f[figure]
            row["fal_billed_sum"] += int(f["fal_billed_micros"])
            row["billed_computed_micros"] += int(f["billed_computed_micros"])
        elif status in ("failed", "canceled"):
            row[status] += n
        else:
            row["open"] += n
            row["open_estimate_micros"] += int(f["cost_micros"])
        row["changed_after"] = row["changed_after"] or bool(f.get("changed_after"))
    for row in rows.values():
        row["cost_cents"] = cents(row["cost_micros"])
        row["micros_per_completed_second"] = per_second(row["cost_micros"], row["billed_seconds"])
        add_billed_totals(row, row.pop("fal_billed_sum"), row.pop("billed_computed_micros"))
    return sorted(rows.values(), key=lambda r: (-r["cost_micros"], str(r[key])))


def ledger_facts(
    conn: LedgerConnection,
    month: date,
    *,
    snapshot_at: datetime | None = None,
    max_generation_id: int | None = None,
    margin: str = IN_FLIGHT_MARGIN,
) -> list[dict]:
    """The month's generations grouped by user, endpoint, status and unpriced (one scan)."""
    start, end = month_range(month)
    return conn.execute(
        q("ledger_month_facts"),
        {
            "start": start,
            "end": end,
            "snapshot_at": snapshot_at or datetime.max.replace(tzinfo=start.tzinfo),
            "max_generation_id": max_generation_id if max_generation_id is not None else 2**62,
            "margin": margin,
        },
    ).fetchall()


def _norm(value: Any) -> Any:
    return Decimal(value).normalize() if isinstance(value, Decimal) else value


def compare_rows(report: list[dict], ledger: list[dict], key: str) -> tuple[list[Difference], set]:
    """Differences between report and ledger rows, every key compared, and the set of keys
    with a row written after the report's snapshot (why they may differ)."""
    by_key_report = {r[key]: r for r in report}
    by_key_ledger = {r[key]: r for r in ledger}
    changed = {k for k, r in by_key_ledger.items() if r.get("changed_after")}
    zero = {**dict.fromkeys(COMPARED, 0), **dict.fromkeys(BILLED)}  # a key one side lacks
    differences = []
    for k in sorted(set(by_key_report) | set(by_key_ledger), key=str):
        mine, theirs = by_key_report.get(k, zero), by_key_ledger.get(k, zero)
        for column in COMPARED:
            if _norm(mine[column]) != _norm(theirs[column]):
                differences.append(Difference(k, column, mine[column], theirs[column]))
    return differences, changed


def _differences_table(differences: list[Difference], key: str) -> str:
    lines = [f"| {key} | column | report | ledger |", "|---|---|---|---|"]
    lines += [f"| {d.key} | {d.column} | {d.report} | {d.ledger} |" for d in differences[:10]]
    return "\n".join(lines)


def report_matches_ledger(
    conn: LedgerConnection, month: date, by: str, *, margin: str = IN_FLIGHT_MARGIN
) -> Finding:
    """The month's report by user (or endpoint) equals the ledger, key by key, exactly.

    `margin`: writes that began this long before the report's snapshot count as changed
    after it (they may have committed after it)."""
    key = KEYS[by]
    name = f"report_by_{by}_matches_ledger"
    with snapshot(conn):
        state = conn.execute(q("report_month"), {"month": month}).fetchone()
        if state is None:
            return Finding(name, False, f"no report for {month:%Y-%m} yet", {"month_state": ""})
        changes = conn.execute(q("report_month_changes"), {"month": month}).fetchone()
        report_rows = q("monthly_by_user") if by == "user" else q("monthly_by_endpoint")
        report = conn.execute(report_rows, {"month": month}).fetchall()
        facts = ledger_facts(
            conn,
            month,
            snapshot_at=state["snapshot_at"],
            max_generation_id=state["max_generation_id"],
            margin=margin,
        )
    ledger = fold_facts(facts, by)
    differences, changed = compare_rows(report, ledger, key)
    report_cost = sum(int(r["cost_micros"]) for r in report)
    ledger_cost = sum(int(r["cost_micros"]) for r in ledger)
    month_changed = bool(changes and changes["changed"])
    metadata: dict[str, Any] = {
        "month_state": state["state"],
        "report_computed_at": state["computed_at"].isoformat(),
        "keys_compared": len({r[key] for r in report} | {r[key] for r in ledger}),
        "keys_changed_since_report": len(changed),
        "keys_differing": len({d.key for d in differences}),
        "report_cost_micros": report_cost,
        "ledger_cost_micros": ledger_cost,
        "difference_micros": report_cost - ledger_cost,
        "report_generations": sum(int(r["generations"]) for r in report),
        "ledger_generations": sum(int(r["generations"]) for r in ledger),
        "month_changed_since_rebuild": month_changed,
        "month_last_changed_at": changes["last_changed_at"].isoformat() if changes else "",
    }
    if changed:
        metadata["changed_since_report"] = [str(k) for k in sorted(changed, key=str)[:SAMPLE]]
    if differences:
        metadata["differences"] = _differences_table(differences, key)
        why = (
            f"the month's ledger changed at {changes['last_changed_at']:%Y-%m-%d %H:%M:%S} UTC, "
            "after the report; the reports' sensor rebuilds it"
            if month_changed and changes  # changes: for the type checker (month_changed says so)
            else f"{len(changed)} {by}(s) written since the report"
            if changed
            else "the report's tables differ"
        )
        summary = (
            f"{metadata['keys_differing']} {by}(s) differ from the ledger "
            f"(cost off by {report_cost - ledger_cost} micro-dollars): {why}; refresh the "
            "month with rebuild: true"
        )
    else:
        summary = (
            f"{metadata['keys_compared']} {by}(s) match the ledger to the micro-dollar "
            f"({ledger_cost} micro-dollars)"
        )
    return Finding(name, not differences, summary, metadata)


def completed_generations_are_priced(conn: LedgerConnection, month: date) -> Finding:
    """Every completed generation of the month has a price behind its cost."""
    start, end = month_range(month)
    with snapshot(conn):
        report = conn.execute(q("monthly_by_endpoint"), {"month": month}).fetchall()
        unpriced = {r["endpoint"]: int(r["unpriced"]) for r in report if r["unpriced"]}
        sample = (
            conn.execute(
                q("unpriced_completed_in_month"), {"start": start, "end": end, "limit": SAMPLE}
            ).fetchall()
            if unpriced
            else []
        )
    total = sum(unpriced.values())
    metadata: dict[str, Any] = {"unpriced_completed": total, "unpriced_endpoints": len(unpriced)}
    if unpriced:
        metadata["by_endpoint"] = unpriced
        metadata["first_unpriced"] = [
            f"{r['request_id']} ({r['endpoint']}, {r['cost_basis']})" for r in sample
        ]
    summary = (
        f"{total} completed generation(s) on {len(unpriced)} endpoint(s) have no price: "
        "their cost is understated"
        if total
        else "every completed generation has a price"
    )
    return Finding("completed_generations_are_priced", total == 0, summary, metadata)


def no_generation_open_too_long(conn: LedgerConnection, month: date, now: datetime) -> Finding:
    """No generation of the month has been open (submitted / in progress) for over 24 h."""
    start, end = month_range(month)
    params = {"start": start, "end": end, "as_of": now, "max_open": MAX_OPEN, "limit": SAMPLE}
    with snapshot(conn):
        stuck = one_row(conn.execute(q("stuck_open_count"), params))["stuck"]
        sample = conn.execute(q("stuck_open_in_month"), params).fetchall()
    metadata: dict[str, Any] = {"open_over_24h": stuck, "as_of": now.isoformat()}
    if sample:
        metadata["oldest_open"] = [
            f"{r['request_id']} ({r['status']} since {r['created_at']:%Y-%m-%d %H:%M} UTC)"
            for r in sample
        ]
    summary = (
        f"{stuck} generation(s) open for more than 24 h: their cost is still an estimate"
        if stuck
        else "no generation open for more than 24 h"
    )
    return Finding("no_generation_open_over_24h", stuck == 0, summary, metadata)


def no_archive_failures(conn: LedgerConnection, month: date) -> Finding:
    """Outputs of the month we hold no copy of: archive failed, or fal's copy was lost
    first (count, and the first request ids with the reason)."""
    start, end = month_range(month)
    params = {"start": start, "end": end, "limit": SAMPLE}
    with snapshot(conn):
        counts = one_row(conn.execute(q("archive_failure_count"), params))
        total = counts["failed"] + counts["lost"]
        sample = conn.execute(q("archive_failures_in_month"), params).fetchall() if total else []
    metadata: dict[str, Any] = {
        "archive_failures": total,
        "archive_failed": counts["failed"],
        "archive_lost": counts["lost"],
    }
    if sample:
        metadata["first_failures"] = [
            f"{r['request_id']} ({r['archive_status']}): {(r['archive_error'] or '')[:120]}"
            for r in sample
        ]
    summary = (
        f"{total} output(s) of the month have no archived copy "
        f"({counts['failed']} failed, {counts['lost']} lost)"
        if total
        else "no archive failures"
    )
    return Finding("no_archive_failures", total == 0, summary, metadata)
