"""Monthly partitions in UTC, the current month included."""

import dagster as dg

from renderqueue_pipeline.settings import get_settings

monthly_partitions = dg.MonthlyPartitionsDefinition(
    start_date=f"{get_settings().reports_start_month}-01", end_offset=1, timezone="UTC"
)
