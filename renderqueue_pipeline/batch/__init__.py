"""Batch submission: prompt files to fal through the ledger, with budgets and cancel.

Plain Python (no Dagster): `defs/batch/` and `renderqueue batch ...` are thin
layers over these functions.
"""

from renderqueue_pipeline.batch.budget import (
    BudgetSettingError,
    budget_overview,
    month_figures,
    parse_usd,
    set_budget,
)
from renderqueue_pipeline.batch.cancel import CancelResult, cancel_batch
from renderqueue_pipeline.batch.inbox import InboxFile, list_inbox, plan_tick
from renderqueue_pipeline.batch.report import BatchNotFound, BatchReport, batch_report
from renderqueue_pipeline.batch.single import (
    BudgetExceeded,
    SubmissionInProgress,
    asubmit_prompt,
    submit_prompt,
)
from renderqueue_pipeline.batch.source import PromptFileError
from renderqueue_pipeline.batch.submit import (
    BatchConfigError,
    BatchOptions,
    BatchResult,
    BatchStopped,
    SubmitOptions,
    submit_batch_file,
)

__all__ = [
    "BatchConfigError",
    "BatchNotFound",
    "BatchOptions",
    "BatchReport",
    "BatchResult",
    "BatchStopped",
    "BudgetExceeded",
    "BudgetSettingError",
    "CancelResult",
    "InboxFile",
    "PromptFileError",
    "SubmissionInProgress",
    "SubmitOptions",
    "asubmit_prompt",
    "batch_report",
    "budget_overview",
    "cancel_batch",
    "list_inbox",
    "month_figures",
    "parse_usd",
    "plan_tick",
    "set_budget",
    "submit_batch_file",
    "submit_prompt",
]
