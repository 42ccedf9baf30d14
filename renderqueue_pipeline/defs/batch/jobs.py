"""`submit_batch` (one prompts file -> one batch) and `cancel_batch`."""

from typing import Any, Literal

import dagster as dg
from pydantic import Field

from renderqueue_pipeline.batch import (
    BatchOptions,
    BatchResult,
    PromptFileError,
    SubmitOptions,
    parse_usd,
    submit_batch_file,
)
from renderqueue_pipeline.batch import (
    cancel_batch as cancel_batch_now,
)
from renderqueue_pipeline.batch.inbox import in_inbox
from renderqueue_pipeline.defs.batch.resources import PromptsInbox
from renderqueue_pipeline.defs.resources import FalConnection, LedgerDatabase
from renderqueue_pipeline.defs.shared import FAL_API_POOL, domain_tags
from renderqueue_pipeline.errors import RenderqueueError
from renderqueue_pipeline.redact import redact

#: Run tag the Dagster instance limits (dagster_home.tag_concurrency_limits) so the
#: inbox cannot flood the run queue.
BATCH_TAGS = domain_tags("batch")


class SubmitBatchConfig(dg.Config):
    """One prompts file to submit as a batch (launchpad or the inbox sensor)."""

    file_url: str = Field(
        description="A file name in the prompts inbox (prompts-2026-12.csv), or the fsspec "
        "URL of a CSV, JSONL or Parquet prompts file in the prompts inbox or under a "
        "RENDERQUEUE_PROMPT_SOURCES prefix (s3://bucket/inbox/prompts.parquet). "
        "Columns: prompt (required), user_id, endpoint, and any model input (duration, "
        "resolution, ...)."
    )
    content_version: str = Field(
        default="",
        description="Version the inbox saw (etag, or size-mtime); set by the sensor.",
    )
    default_user_id: int | None = Field(
        default=None, description="user_id for rows without one (none: such rows are rejected)."
    )
    default_endpoint: str | None = Field(
        default=None,
        description="fal endpoint id for rows without one, e.g. "
        "bytedance/seedance-2.0/text-to-video.",
    )
    default_inputs: dict[str, Any] = Field(
        default_factory=dict,
        description='Model inputs for every row unless the row sets them, e.g. {"duration": '
        '"5", "resolution": "720p"}.',
    )
    max_cost_usd: float | None = Field(
        default=None,
        description="Cap on the batch's estimated cost in USD; rows past it are rejected as "
        "over budget (none: no batch cap; users' monthly budgets still apply).",
    )
    concurrency: int = Field(default=16, description="Requests in flight to fal (1-256).")
    priority: Literal["low", "normal"] = Field(
        default="low",
        description="fal queue priority of the batch's requests (low: a product's submits, "
        "at normal, start first under the account's concurrency cap).",
    )
    resubmit_unknown: bool = Field(
        default=False,
        description="Resend items whose outcome is unknown after a crash, only those fal's "
        "request list shows it never received (the others are adopted, not resent).",
    )


def _options(config: SubmitBatchConfig) -> BatchOptions:
    return BatchOptions(
        default_user_id=config.default_user_id,
        default_endpoint=config.default_endpoint,
        default_inputs=config.default_inputs,
        max_cost_micros=(
            None
            if config.max_cost_usd is None
            else parse_usd(repr(config.max_cost_usd), "max_cost_usd")
        ),
        concurrency=config.concurrency,
        resubmit_unknown=config.resubmit_unknown,
        priority=config.priority,
        content_version=config.content_version,
    )


def result_metadata(result: BatchResult) -> dict[str, dg.MetadataValue]:
    """Counts, the first 20 rejections and the unknown outcomes, as run metadata."""
    report, stats = result.report, result.stats
    counts = report.counts
    return {
        "batch_id": dg.MetadataValue.int(report.batch_id),
        "status": dg.MetadataValue.text(report.status),
        "duplicate": dg.MetadataValue.bool(result.duplicate),
        "source": dg.MetadataValue.text(redact(report.source)),
        "sha256": dg.MetadataValue.text(report.sha256 or ""),
        "read": dg.MetadataValue.int(counts["read"]),
        "submitted": dg.MetadataValue.int(counts["submitted"]),
        "rejected": dg.MetadataValue.int(counts["rejected"]),
        "over_budget": dg.MetadataValue.int(counts["over_budget"]),
        "unknown": dg.MetadataValue.int(counts["unknown"]),
        "submitted_this_run": dg.MetadataValue.int(stats.submitted),
        "submits_per_second": dg.MetadataValue.float(round(result.submit_rate, 1)),
        "rate_limited_calls": dg.MetadataValue.int(stats.rate_limited),
        "seconds": dg.MetadataValue.float(round(stats.elapsed, 2)),
        "rejections": dg.MetadataValue.md(redact(report.rejections_markdown(link_lines=True))),
        "unknown_outcomes": dg.MetadataValue.md(redact(report.unknown_markdown())),
    }


@dg.op(pool=FAL_API_POOL, tags=BATCH_TAGS)
def submit_prompts_file(
    context: dg.OpExecutionContext,
    config: SubmitBatchConfig,
    ledger: LedgerDatabase,
    prompts_inbox: PromptsInbox,
    fal: dg.ResourceParam[FalConnection],
) -> int:
    """Submit the file's good rows to fal; rejected rows are recorded with their reasons."""
    try:
        result = submit_batch_file(
            in_inbox(config.file_url, prompts_inbox.resolved_url()),
            _options(config),
            submit_options=SubmitOptions.from_settings(fal.settings),
            ledger_url=ledger.resolved_url(),
            log=context.log.info,
            allow_local=False,  # the launchpad may name only the inbox and allowed prefixes
            allowed_prefixes=[prompts_inbox.resolved_url()],
            gateway_factory=fal.gateway,
            platform_factory=fal.platform,
        )
    except PromptFileError as exc:
        raise dg.Failure(description=redact(exc), allow_retries=False) from None
    except RenderqueueError as exc:
        raise dg.Failure(description=redact(exc)) from None
    except Exception as exc:  # noqa: BLE001 - the traceback would carry the text unredacted
        raise dg.Failure(description=redact(f"{type(exc).__name__}: {exc}")) from None
    context.add_output_metadata(result_metadata(result))
    context.log.info(redact(result.report.summary()))
    return result.batch_id


SUBMIT_BATCH_EXAMPLE = """\
ops:
  submit_prompts_file:
    config:
      file_url: prompts-2026-12.csv      # a file in the prompts inbox
      default_user_id: 42                # for rows without user_id
      default_endpoint: bytedance/seedance-2.0/text-to-video
      default_inputs: {duration: "5", resolution: "720p"}
      max_cost_usd: 50.0                 # cap on the batch's estimated cost
      concurrency: 16
"""


@dg.job(
    tags=BATCH_TAGS,
    description="Submit one prompts file (CSV, JSONL, Parquet) to fal as a batch: rows "
    "validated one by one, budgets enforced, bounded fan-out, nothing submitted twice. "
    "Launchpad example (only file_url is required):\n\n```yaml\n" + SUBMIT_BATCH_EXAMPLE + "```",
)
def submit_batch() -> None:
    submit_prompts_file()


class CancelBatchConfig(dg.Config):
    """The batch to cancel."""

    batch_id: int = Field(description="Id of the batch (run metadata of submit_batch).")


@dg.op(name="cancel_batch_requests", pool=FAL_API_POOL, tags=BATCH_TAGS)
def cancel_batch_requests(
    context: dg.OpExecutionContext,
    config: CancelBatchConfig,
    ledger: LedgerDatabase,
    fal: dg.ResourceParam[FalConnection],
) -> int:
    """Stop the batch and ask fal to cancel its queued and running requests."""
    try:
        result = cancel_batch_now(
            config.batch_id,
            ledger_url=ledger.resolved_url(),
            log=context.log.info,
            gateway_factory=fal.gateway,
        )
    except RenderqueueError as exc:
        raise dg.Failure(description=redact(exc), allow_retries=False) from None
    errors = "\n".join(
        f"| {e['line_no']} | {e['request_id']} | {e['error']} |" for e in result.errors
    )
    context.add_output_metadata(
        {
            "batch_id": dg.MetadataValue.int(result.batch_id),
            "asked": dg.MetadataValue.int(result.asked),
            "outcomes": dg.MetadataValue.json(dict(result.outcomes)),
            "errors": dg.MetadataValue.md(
                redact(f"| line | request | error |\n|---:|---|---|\n{errors}")
                if errors
                else "none"
            ),
        }
    )
    context.log.info(result.summary())
    return result.asked


@dg.job(
    tags=BATCH_TAGS,
    description="Cancel a batch: stop submitting its rows and cancel its queued and running "
    "requests at fal (a running request may still finish and be billed).",
)
def cancel_batch() -> None:
    cancel_batch_requests()
