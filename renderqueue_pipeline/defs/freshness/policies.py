"""How fresh the spend and billing assets must be (docs/dagster.md, "Freshness").

Two halves, because Dagster 1.13 shows them in two places: a `FreshnessPolicy` on the
asset gives the UI's fresh/late badge (the freshness daemon evaluates it), and a freshness
*check* (checks.py) turns "late" into a failed asset check that sensors can post.
"""

from __future__ import annotations

from datetime import timedelta

import dagster as dg

#: The current month's report tables and the forecast refresh hourly (at :15 and :20);
#: two hours without a materialization means two missed runs.
CURRENT_MONTH_MAX_AGE = timedelta(hours=2)
#: The daily billing load runs at 05:30 UTC for yesterday; it must have landed by 08:00.
BILLING_DEADLINE_CRON = "0 8 * * *"
BILLING_WINDOW = timedelta(hours=8)  # a load since 00:00 UTC counts for the day

current_month_policy = dg.FreshnessPolicy.time_window(fail_window=CURRENT_MONTH_MAX_AGE)
daily_billing_policy = dg.FreshnessPolicy.cron(
    deadline_cron=BILLING_DEADLINE_CRON, lower_bound_delta=BILLING_WINDOW, timezone="UTC"
)
