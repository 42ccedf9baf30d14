"""The demo's sample data, shared by `renderqueue dev` and `renderqueue demo --headless`.

The prompts file (eight users, four endpoints, five bad rows) and the one budget that makes
user 106 go over it. Both entry points put these in place the same way, through here, so
neither imports the other.
"""

from __future__ import annotations

from importlib import resources

import fsspec

from renderqueue_pipeline.batch.budget import parse_usd, set_budget
from renderqueue_pipeline.db import one_row
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.queries import q

SAMPLE_PROMPTS = "prompts-demo.csv"
OVER_BUDGET_USER = 106
OVER_BUDGET_USD = "25"


def sample_prompts_text() -> str:
    """The demo's prompts file: several users and endpoints, a few bad rows."""
    return resources.files(__name__).joinpath(SAMPLE_PROMPTS).read_text()


def drop_sample_prompts(prompts_url: str) -> str:
    """Put the demo's prompts file in the inbox (same name and content: a no-op)."""
    fs, root = fsspec.core.url_to_fs(prompts_url)
    fs.makedirs(root, exist_ok=True)
    target = f"{root.rstrip('/')}/{SAMPLE_PROMPTS}"
    text = sample_prompts_text()
    if not fs.exists(target) or fs.cat_file(target).decode() != text:
        partial = f"{root.rstrip('/')}/.{SAMPLE_PROMPTS}.part"  # ignored by the inbox sensor
        fs.pipe_file(partial, text.encode())
        fs.mv(partial, target)
    return target


def prepare_demo_ledger(url: str) -> None:
    """One user gets a small monthly budget, so the demo shows a budget refusal.

    The month is the ledger clock's (`rq_now()`), the month admission checks against.
    """
    with connect(url) as conn:
        month = one_row(conn.execute(q("current_utc_month")))["month"]
        params = {"user_id": OVER_BUDGET_USER, "month": month}
        if not conn.execute(q("demo_budget_exists"), params).fetchone():
            set_budget(conn, OVER_BUDGET_USER, parse_usd(OVER_BUDGET_USD, "budget"), month)
