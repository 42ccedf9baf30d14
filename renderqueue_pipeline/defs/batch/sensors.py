"""`prompts_inbox_sensor`: one `submit_batch` run per new file in the prompts inbox."""

import dagster as dg

from renderqueue_pipeline.batch.inbox import plan_tick
from renderqueue_pipeline.defs.batch.jobs import BATCH_TAGS, submit_batch
from renderqueue_pipeline.defs.batch.resources import PromptsInbox

MAX_RUNS_PER_TICK = 20


@dg.sensor(
    job=submit_batch,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Lists the prompts inbox (RENDERQUEUE_PROMPTS_URL) and requests one "
    "submit_batch run per new file once it has been unchanged for one tick; at most "
    f"{MAX_RUNS_PER_TICK} runs per tick. Reading, hashing and fal calls happen in the run.",
)
def prompts_inbox_sensor(
    context: dg.SensorEvaluationContext, prompts_inbox: PromptsInbox
) -> dg.SensorResult:
    plan = plan_tick(prompts_inbox.list_files(), context.cursor, MAX_RUNS_PER_TICK)
    if plan.waiting:
        names = ", ".join(f.path.rsplit("/", 1)[-1] for f in plan.waiting[:5])
        context.log.info(f"{len(plan.waiting)} new or changing files wait one tick: {names}")
    run_requests = [
        dg.RunRequest(
            run_key=f.run_key,
            run_config=dg.RunConfig(
                ops={
                    "submit_prompts_file": {
                        "config": {"file_url": f.url, "content_version": f.version}
                    }
                }
            ),
            tags={**BATCH_TAGS, "renderqueue/file": f.path.rsplit("/", 1)[-1][:63]},
        )
        for f in plan.requests
    ]
    if not run_requests:
        return dg.SensorResult(
            cursor=plan.cursor,
            skip_reason=f"no file ready ({plan.considered} new, {len(plan.waiting)} waiting)",
        )
    return dg.SensorResult(cursor=plan.cursor, run_requests=run_requests)
