"""What the domain folders under defs/ share, defined once: pools, run tags, the run
statuses that count as "in flight", and the partitions with their start month.

Constants, no environment: the partitions are part of the definitions' identity (the
snapshot in tests/snapshots/definitions.json), so they never depend on where they load.
"""

from __future__ import annotations

import datetime as dt

import dagster as dg

from renderqueue_pipeline.dagster_home import ARCHIVE_TAG_KEY, DOMAIN_TAG, FAL_API_POOL

__all__ = [
    "ARCHIVE_TAG_KEY",
    "DOMAIN_TAG",
    "FAL_API_POOL",
    "IN_FLIGHT_RUN_STATUSES",
    "START_DATE",
    "START_MONTH",
    "daily_partitions",
    "domain_tags",
    "monthly_partitions",
]

#: The first month of the ledger's days and months in Dagster (fal's billing, the reports).
START_MONTH = "2026-01"
START_DATE = dt.date.fromisoformat(f"{START_MONTH}-01")

#: UTC days from START_DATE to today; UTC months from START_MONTH to the current month.
daily_partitions = dg.DailyPartitionsDefinition(
    start_date=START_DATE.isoformat(), end_offset=1, timezone="UTC"
)
monthly_partitions = dg.MonthlyPartitionsDefinition(
    start_date=START_DATE.isoformat(), end_offset=1, timezone="UTC"
)

#: A run in any of these may still write (a canceling run's op is still running): a
#: sensor or schedule that must not overlap its own job waits for all of them.
IN_FLIGHT_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def domain_tags(domain: str) -> dict[str, str]:
    """The run tag of a domain's jobs; dagster.yaml limits runs per value (dagster_home)."""
    return {DOMAIN_TAG: domain}
