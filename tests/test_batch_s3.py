"""The prompts inbox on S3: moto's S3 server over real HTTP, read through s3fs."""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import psycopg
import pytest
import s3fs
from batch_helpers import SEEDANCE, dagster_instance, ledger_counts, prompts, submit_file, write_csv

from renderqueue_pipeline.batch import BatchOptions
from renderqueue_pipeline.batch.source import PromptFileError
from renderqueue_pipeline.defs.batch.resources import PromptsInbox
from renderqueue_pipeline.defs.batch.sensors import prompts_inbox_sensor
from renderqueue_pipeline.simulator.testing import RunningSimulator


@pytest.fixture
def instance(dagster_storage: str) -> Iterator[dg.DagsterInstance]:
    with dagster_instance(dagster_storage) as instance:
        yield instance


@pytest.fixture
def bucket(s3_env: str) -> Iterator[str]:

    fs = s3fs.S3FileSystem()
    name = "prompts-inbox"
    if not fs.exists(name):
        fs.mkdir(name)
    yield name
    fs.rm(name, recursive=True)


def test_a_file_on_s3_is_listed_by_the_sensor_and_submitted(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    ledger_url: str,
    bucket: str,
    instance: dg.DagsterInstance,
    tmp_path,
) -> None:

    fs = s3fs.S3FileSystem()
    local = write_csv(tmp_path / "w.csv", [{**r, "endpoint": SEEDANCE} for r in prompts(3)])
    fs.put(str(local), f"{bucket}/inbox/week48.csv")
    fs.pipe(f"{bucket}/inbox/.week49.csv", b"prompt\nhidden\n")

    inbox = PromptsInbox(url=f"s3://{bucket}/inbox")

    def tick(cursor):
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"prompts_inbox": inbox}
        )
        return prompts_inbox_sensor(context)

    first = tick(None)
    assert not first.run_requests
    [request] = tick(first.cursor).run_requests
    file_url = request.run_config["ops"]["submit_prompts_file"]["config"]["file_url"]
    assert file_url == f"s3://{bucket}/inbox/week48.csv"
    assert (
        request.run_key == f"{bucket}/inbox/week48.csv@{fs.info(file_url)['ETag'].strip(chr(34))}"
    )

    allowed = [inbox.resolved_url()]  # the inbox is an allowed prompt source
    result = submit_file(file_url, BatchOptions(), ledger_url=ledger_url, allowed_prefixes=allowed)
    assert result.report.counts["submitted"] == 3
    # the same bytes uploaded under another key: recognised, nothing sent
    fs.copy(file_url, f"{bucket}/inbox/week48-again.csv")
    again = submit_file(
        f"s3://{bucket}/inbox/week48-again.csv",
        BatchOptions(),
        ledger_url=ledger_url,
        allowed_prefixes=allowed,
    )
    assert again.duplicate
    assert again.batch_id == result.batch_id
    assert len(fal_sim.control.ground_truth()) == 3


def test_a_prompts_url_whose_bucket_does_not_exist_says_so(
    conn: psycopg.Connection, ledger_url: str, s3_env: str, instance: dg.DagsterInstance
) -> None:
    inbox = PromptsInbox(url="s3://no-such-bucket-here/inbox")
    with pytest.raises(PromptFileError) as caught:
        prompts_inbox_sensor(
            dg.build_sensor_context(instance=instance, resources={"prompts_inbox": inbox})
        )
    assert str(caught.value) == (
        "s3://no-such-bucket-here/inbox: bucket 'no-such-bucket-here' does not exist "
        "(or is not visible with these credentials)"
    )
    with pytest.raises(PromptFileError, match="bucket 'no-such-bucket-here' does not exist"):
        submit_file(
            "s3://no-such-bucket-here/inbox/a.csv",
            ledger_url=ledger_url,
            allowed_prefixes=["s3://no-such-bucket-here/inbox"],
        )
    assert ledger_counts(conn) == (0, 0, 0)
