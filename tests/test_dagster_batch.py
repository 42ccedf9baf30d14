"""The batch domain on a real Dagster instance with Postgres storage.

The inbox sensor over a temporary folder (new, unchanged, renamed, partly written and
bad files) through `build_sensor_context`, each RunRequest's config validated and run;
`submit_batch` against the simulator with its run metadata; `cancel_batch`; launchpad
config of the wrong type.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml
from batch_helpers import SEEDANCE, dagster_instance, ledger_counts, prompts, write_csv

from renderqueue_pipeline.definitions import defs
from renderqueue_pipeline.defs.batch.jobs import (
    BATCH_TAGS,
    SUBMIT_BATCH_EXAMPLE,
    cancel_batch,
    submit_batch,
)
from renderqueue_pipeline.defs.batch.resources import PromptsInbox
from renderqueue_pipeline.defs.batch.sensors import prompts_inbox_sensor
from renderqueue_pipeline.defs.resources import LedgerDatabase, fal_connection
from renderqueue_pipeline.simulator.testing import RunningSimulator


@pytest.fixture
def instance(dagster_storage: str) -> Iterator[dg.DagsterInstance]:
    with dagster_instance(dagster_storage) as instance:
        yield instance


class Inbox:
    """A temporary prompts inbox and the sensor's cursor between ticks."""

    def __init__(self, folder: Path, instance: dg.DagsterInstance, ledger_url: str) -> None:
        self.folder = folder
        self.instance = instance
        self.ledger_url = ledger_url
        self.cursor: str | None = None

    def tick(self) -> list[dg.RunRequest]:
        context = dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursor,
            resources={"prompts_inbox": PromptsInbox(url=self.folder.as_uri())},
        )
        result = prompts_inbox_sensor(context)
        self.cursor = result.cursor
        return list(result.run_requests or [])

    def run(self, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
        config = request.run_config
        config = config.to_config_dict() if isinstance(config, dg.RunConfig) else config
        assert dg.validate_run_config(submit_batch, config)
        return submit_batch.execute_in_process(
            run_config=config,
            instance=self.instance,
            resources={
                "ledger": LedgerDatabase(url=self.ledger_url),
                "prompts_inbox": PromptsInbox(url=self.folder.as_uri()),
                "fal": fal_connection(),
            },
            tags=request.tags,
            raise_on_error=False,
        )


def metadata(result: dg.ExecuteInProcessResult) -> dict:
    [event] = [
        e
        for e in result.all_node_events
        if e.event_type_value == "STEP_OUTPUT" and e.step_key == "submit_prompts_file"
    ]
    return {k: v.value for k, v in event.event_specific_data.metadata.items()}


def test_inbox_sensor_new_unchanged_renamed_partial_and_bad_files(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    ledger_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    inbox = Inbox(folder, instance, ledger_url)
    rows = prompts(5)
    rows[2]["user_id"] = "x"
    write_csv(folder / "week48.csv", [{**r, "endpoint": SEEDANCE} for r in rows])
    (folder / "week49.csv.part").write_text("prompt,user_id\nhalf a fi")  # still uploading

    assert inbox.tick() == []  # seen once: must stand still for a tick
    [request] = inbox.tick()
    assert request.run_key.endswith("week48.csv@" + request.run_key.rsplit("@", 1)[1])
    assert request.tags["renderqueue/domain"] == BATCH_TAGS["renderqueue/domain"]
    first = inbox.run(request)
    assert first.success
    meta = metadata(first)
    assert (meta["read"], meta["submitted"], meta["rejected"], meta["over_budget"]) == (5, 4, 1, 0)
    assert meta["unknown"] == 0
    assert meta["duplicate"] is False
    line_4 = f"[4]({(folder / 'week48.csv').as_uri()}#L4)"
    assert f"| {line_4} | user_id | expected an integer, got 'x' |" in meta["rejections"]
    assert len(fal_sim.control.ground_truth()) == 4

    assert inbox.tick() == []  # nothing changed: nothing requested

    # the upload finishes under its real name; a renamed copy of week 48 arrives too
    (folder / "week49.csv.part").rename(folder / "week49.csv")
    (folder / "week49.csv").write_text(f"prompt,user_id,endpoint\nan owl,8,{SEEDANCE}\n")
    time.sleep(0.01)
    (folder / "week48.csv").rename(folder / "week48-copy.csv")
    assert inbox.tick() == []
    requests = {Path(r.run_key.split("@")[0]).name: r for r in inbox.tick()}
    assert set(requests) == {"week49.csv", "week48-copy.csv"}
    assert metadata(inbox.run(requests["week49.csv"]))["submitted"] == 1
    copy = inbox.run(requests["week48-copy.csv"])
    assert copy.success
    assert metadata(copy)["duplicate"] is True
    assert metadata(copy)["batch_id"] == meta["batch_id"]
    assert len(fal_sim.control.ground_truth()) == 5  # the copy sent nothing

    # a binary file named .csv: the run fails saying why, the ledger is untouched
    before = ledger_counts(conn)
    (folder / "photo.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    inbox.tick()
    [bad] = inbox.tick()
    failed = inbox.run(bad)
    assert not failed.success
    failure = failed.failure_data_for_node("submit_prompts_file").error
    assert "photo.csv: not a text file (a NUL byte at offset 8)" in failure.message
    assert ledger_counts(conn) == before


def test_submit_batch_from_the_launchpad_with_defaults_and_a_cap(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    ledger_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
) -> None:
    path = write_csv(tmp_path / "a.csv", [{"prompt": f"p{i}"} for i in range(6)])
    config = {
        "ops": {
            "submit_prompts_file": {
                "config": {
                    "file_url": path.as_uri(),
                    "default_user_id": 5,
                    "default_endpoint": SEEDANCE,
                    "default_inputs": {"duration": "4", "resolution": "480p"},
                    "max_cost_usd": 2.5,
                    "concurrency": 4,
                }
            }
        }
    }
    result = submit_batch.execute_in_process(
        run_config=config,
        instance=instance,
        resources={
            "ledger": LedgerDatabase(url=ledger_url),
            "prompts_inbox": PromptsInbox(url=tmp_path.as_uri()),
            "fal": fal_connection(),
        },
    )
    assert result.success
    meta = metadata(result)
    # 480p Seedance: 854*480*24/1024 tokens/s at $0.014/1k -> $0.134505/s; 4 s each
    per_row = round(854 * 480 * 24 / 1024 * 0.014 / 1000 * 4 * 1_000_000)
    fits = 2_500_000 // per_row
    assert (meta["submitted"], meta["over_budget"]) == (fits, 6 - fits)
    assert "max_cost_usd" in meta["rejections"]
    assert {g["user_id"] for g in conn.execute("select user_id from generations")} == {5}
    assert instance.get_run_by_id(result.run_id).tags["renderqueue/domain"] == "batch"


def test_the_documented_launchpad_example_runs_with_a_file_name_in_the_inbox(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    ledger_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
) -> None:
    """The job's description shows a config a person can paste; `file_url` is a bare file
    name in the prompts inbox; each rejected row in the run's metadata links to its line."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_csv(
        inbox / "prompts-2026-12.csv",
        [{"prompt": "a fox"}, {"prompt": ""}, {"prompt": "a heron", "duration": "99"}],
    )
    assert SUBMIT_BATCH_EXAMPLE in (submit_batch.description or "")
    config = yaml.safe_load(SUBMIT_BATCH_EXAMPLE)
    assert config["ops"]["submit_prompts_file"]["config"]["file_url"] == "prompts-2026-12.csv"
    result = submit_batch.execute_in_process(
        run_config=config,
        instance=instance,
        resources={
            "ledger": LedgerDatabase(url=ledger_url),
            "prompts_inbox": PromptsInbox(url=inbox.as_uri()),
            "fal": fal_connection(),
        },
    )
    assert result.success
    meta = metadata(result)
    assert (meta["submitted"], meta["rejected"]) == (1, 2)
    source = (inbox / "prompts-2026-12.csv").as_uri()
    assert meta["source"] == source
    assert f"| [3]({source}#L3) | prompt |" in meta["rejections"]
    assert f"[4]({source}#L4)" in meta["rejections"]
    assert {g["user_id"] for g in conn.execute("select user_id from generations")} == {42}


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"file_url": "x.csv", "concurrency": "lots"}, 'Value "lots"'),
        ({"file_url": "x.csv", "max_cost_usd": "ten dollars"}, "max_cost_usd"),
        ({"file_url": 7}, "file_url"),
        ({"default_user_id": 5}, 'Missing required config entry "file_url"'),
    ],
)
def test_launchpad_config_of_the_wrong_type_is_refused_naming_the_field(config, says) -> None:
    with pytest.raises(dg.DagsterInvalidConfigError) as caught:
        dg.validate_run_config(submit_batch, {"ops": {"submit_prompts_file": {"config": config}}})
    assert says in str(caught.value)


def test_a_bad_setting_fails_the_run_with_its_name(
    conn: psycopg.Connection, ledger_url: str, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "a.csv", prompts(2))
    for bad, says in (
        ({"max_cost_usd": -3.0}, "max_cost_usd: must not be negative"),
        ({"concurrency": 0}, "concurrency: must be between 1 and 256"),
    ):
        result = submit_batch.execute_in_process(
            run_config={
                "ops": {
                    "submit_prompts_file": {
                        "config": {"file_url": path.as_uri(), "default_endpoint": SEEDANCE, **bad}
                    }
                }
            },
            instance=instance,
            resources={
                "ledger": LedgerDatabase(url=ledger_url),
                "prompts_inbox": PromptsInbox(url=tmp_path.as_uri()),
                "fal": fal_connection(),
            },
            raise_on_error=False,
        )
        assert not result.success
        assert says in result.failure_data_for_node("submit_prompts_file").error.message
    assert ledger_counts(conn) == (0, 0, 0)


def test_cancel_batch_cancels_queued_requests_at_fal(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    ledger_url: str,
    instance: dg.DagsterInstance,
    tmp_path: Path,
) -> None:
    fal_sim.control.set_faults(queue_delay="30")  # everything waits in fal's queue
    path = write_csv(tmp_path / "a.csv", prompts(4))
    resources = {
        "ledger": LedgerDatabase(url=ledger_url),
        "prompts_inbox": PromptsInbox(url=tmp_path.as_uri()),
        "fal": fal_connection(),
    }
    submitted = submit_batch.execute_in_process(
        run_config={
            "ops": {
                "submit_prompts_file": {
                    "config": {"file_url": path.as_uri(), "default_endpoint": SEEDANCE}
                }
            }
        },
        instance=instance,
        resources=resources,
    )
    batch_id = submitted.output_for_node("submit_prompts_file")
    result = cancel_batch.execute_in_process(
        run_config={"ops": {"cancel_batch_requests": {"config": {"batch_id": batch_id}}}},
        instance=instance,
        resources=resources,
    )
    assert result.success
    assert result.output_for_node("cancel_batch_requests") == 4
    items = conn.execute(
        "select i.cancel_outcome, g.cancel_requested_at, g.status::text as status "
        "from batch_items i join generations g on g.request_id = i.request_id"
    ).fetchall()
    assert [i["cancel_outcome"] for i in items] == ["cancellation_requested"] * 4
    assert all(i["cancel_requested_at"] is not None for i in items)
    assert {t["status"] for t in fal_sim.control.ground_truth()} == {"canceled"}
    status = conn.execute("select status from batches where id = %s", (batch_id,)).fetchone()
    assert status["status"] == "canceled"

    # a second cancel finds nothing left open at fal... once fal's answer is recorded
    again = cancel_batch.execute_in_process(
        run_config={"ops": {"cancel_batch_requests": {"config": {"batch_id": batch_id}}}},
        instance=instance,
        resources=resources,
    )
    assert again.success


def test_cancel_of_an_unknown_batch_says_so(
    fal_sim: RunningSimulator,
    conn: psycopg.Connection,
    ledger_url: str,
    instance: dg.DagsterInstance,
) -> None:
    result = cancel_batch.execute_in_process(
        run_config={"ops": {"cancel_batch_requests": {"config": {"batch_id": 999}}}},
        instance=instance,
        resources={"ledger": LedgerDatabase(url=ledger_url), "fal": fal_connection()},
        raise_on_error=False,
    )
    assert not result.success
    assert "no batch 999" in result.failure_data_for_node("cancel_batch_requests").error.message


def test_the_sensor_runs_by_default_and_the_ops_share_the_fal_pool() -> None:

    definitions = defs()
    sensor = definitions.get_sensor_def("prompts_inbox_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    for job_name, op_name in (
        ("submit_batch", "submit_prompts_file"),
        ("cancel_batch", "cancel_batch_requests"),
    ):
        job = definitions.resolve_job_def(job_name)
        assert job.tags["renderqueue/domain"] == "batch"
        assert job.get_node_named(op_name).definition.pool == "fal_api"
    assert os.environ.get("FAL_KEY")  # the simulator plugin's key, for the jobs above
