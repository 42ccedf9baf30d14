"""The code location as a whole: its shape is pinned, its lineage is one story.

The snapshot (tests/snapshots/definitions.json) lists every job, asset, check, sensor and
schedule with what an operator relies on: crons, tags, pools, partitions, default
statuses, each asset's upstream. A change to any of them shows in review as a diff of
that file; refresh it with the command in the failure message.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from renderqueue_pipeline.definitions import defs as load_defs
from renderqueue_pipeline.defs import shared

SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"
REFRESH = "RENDERQUEUE_UPDATE_SNAPSHOTS=1 .venv/bin/pytest -q tests/test_dagster_definitions.py"

INBOX = dg.AssetKey("prompts_inbox")
LEDGER = dg.AssetKey("generations")
REPORT_FILES = dg.AssetKey("spend_report_files")


@pytest.fixture(scope="module")
def definitions() -> dg.Definitions:
    return load_defs()


def _partitions(partitions_def: dg.PartitionsDefinition | None) -> str | None:
    return None if partitions_def is None else str(partitions_def)


def _status(status: Any) -> str | None:
    return None if status is None else status.value


def describe(definitions: dg.Definitions) -> dict[str, Any]:
    """Names and the settings an operator relies on, in a stable, reviewable order."""
    graph = definitions.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "kinds": sorted(node.kinds),
            "deps": sorted(parent.to_user_string() for parent in node.parent_keys),
            "partitions": _partitions(node.partitions_def),
            "materializable": node.is_materializable,
            "pools": sorted(node.pools or []),
            "freshness_policy": repr(node.freshness_policy) if node.freshness_policy else None,
            "tags": {  # kinds are listed above
                k: v for k, v in sorted(node.tags.items()) if not k.startswith("dagster/kind/")
            },
            "owners": sorted(node.owners),
        }
    checks = {}
    for check_key in sorted(graph.asset_check_keys, key=lambda k: k.to_user_string()):
        spec = graph.get_check_spec(check_key)
        checks[check_key.to_user_string()] = {
            "blocking": spec.blocking,
            "partitions": _partitions(spec.partitions_def),
        }
    jobs = {}
    for job in sorted(definitions.resolve_all_job_defs(), key=lambda j: j.name):
        if job.name.startswith("__"):  # Dagster's implicit asset job
            continue
        selected = job.asset_layer.selected_asset_keys if job.asset_layer else set()
        jobs[job.name] = {
            "tags": dict(sorted(job.tags.items())),
            "partitions": _partitions(job.partitions_def),
            "assets": sorted(key.to_user_string() for key in selected),
            "ops": {
                node.name: {
                    "pool": getattr(node.definition, "pool", None),
                    "tags": dict(sorted(node.definition.tags.items())),
                }
                for node in sorted(job.nodes, key=lambda n: n.name)
                if not selected  # an op job's ops; an asset job is its assets
            },
        }
    sensors = {}
    for sensor in sorted(definitions.sensors or [], key=lambda s: s.name):
        sensors[sensor.name] = {
            "jobs": sorted(target.job_name for target in sensor.targets),
            "minimum_interval_seconds": sensor.minimum_interval_seconds,
            "default_status": _status(sensor.default_status),
        }
    schedules = {}
    for schedule in sorted(definitions.schedules or [], key=lambda s: s.name):
        schedules[schedule.name] = {
            "job": schedule.job_name,
            "cron": schedule.cron_schedule,
            "timezone": schedule.execution_timezone,
            "default_status": _status(schedule.default_status),
        }
    return {
        "assets": assets,
        "checks": checks,
        "jobs": jobs,
        "sensors": sensors,
        "schedules": schedules,
    }


def test_definitions_match_the_reviewed_snapshot(definitions: dg.Definitions) -> None:
    current = json.dumps(describe(definitions), indent=2, sort_keys=True) + "\n"
    if os.environ.get("RENDERQUEUE_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(current)
    assert SNAPSHOT.exists(), f"no snapshot yet; write it with: {REFRESH}"
    assert current == SNAPSHOT.read_text(), (
        "the definitions differ from tests/snapshots/definitions.json; if the change is "
        f"meant, refresh it with `{REFRESH}` and commit the diff"
    )


def _edges(definitions: dg.Definitions) -> dict[dg.AssetKey, set[dg.AssetKey]]:
    graph = definitions.resolve_asset_graph()
    return {key: set(graph.get(key).child_keys) for key in graph.get_all_asset_keys()}


def _reachable(start: dg.AssetKey, edges: dict[dg.AssetKey, set[dg.AssetKey]]) -> set:
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_lineage_is_one_graph_from_the_prompts_inbox_to_the_report_files(
    definitions: dg.Definitions,
) -> None:
    edges = _edges(definitions)
    undirected: dict[dg.AssetKey, set[dg.AssetKey]] = defaultdict(set)
    for parent, children in edges.items():
        undirected[parent] |= children
        for child in children:
            undirected[child].add(parent)
    component = _reachable(INBOX, {key: undirected[key] for key in edges})
    assert component == set(edges), f"not connected to the inbox: {set(edges) - component}"

    downstream_of_inbox = _reachable(INBOX, edges)
    assert LEDGER in downstream_of_inbox
    assert REPORT_FILES in downstream_of_inbox
    assert _reachable(LEDGER, edges) <= downstream_of_inbox


def test_the_ledger_and_the_inbox_are_assets_no_run_materializes(
    definitions: dg.Definitions,
) -> None:
    graph = definitions.resolve_asset_graph()
    for key in (INBOX, LEDGER):
        node = graph.get(key)
        assert not node.is_materializable, key  # written outside Dagster's assets
        assert node.description, key
    description = graph.get(LEDGER).description or ""
    for writer in ("submit_batch", "receiver", "reconciler"):
        assert writer in description


def test_every_job_carries_its_domain_tag(definitions: dg.Definitions) -> None:
    untagged = [
        job.name
        for job in definitions.resolve_all_job_defs()
        if not job.name.startswith("__") and shared.DOMAIN_TAG not in job.tags
    ]
    assert untagged == []


def test_partitioned_definitions_share_one_daily_and_one_monthly_partitioning(
    definitions: dg.Definitions,
) -> None:
    graph = definitions.resolve_asset_graph()
    used = [graph.get(key).partitions_def for key in graph.get_all_asset_keys()]
    used += [job.partitions_def for job in definitions.resolve_all_job_defs()]
    used += [graph.get_check_spec(key).partitions_def for key in graph.asset_check_keys]
    one = (shared.daily_partitions, shared.monthly_partitions)
    assert [p for p in used if p is not None and not any(p is o for o in one)] == []
    assert shared.daily_partitions.get_first_partition_key() == shared.START_DATE.isoformat()
    assert shared.monthly_partitions.get_first_partition_key() == shared.START_DATE.isoformat()
