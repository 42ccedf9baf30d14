"""Helpers the batch submission tests share: prompt files and the published prices."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

from renderqueue_pipeline.batch import BatchOptions, BatchResult, SubmitOptions, submit_batch_file
from renderqueue_pipeline.defs.resources import FalConnection
from renderqueue_pipeline.settings import load_settings

SEEDANCE = "bytedance/seedance-2.0/text-to-video"
SEEDANCE_FAST = "bytedance/seedance-2.0/fast/text-to-video"
#: fal's published Seedance 2.0 price at 720p, $ per second of video.
SEEDANCE_720P_USD_PER_S = Decimal("0.3034")


def submit_file(url: str, options: BatchOptions | None = None, **given: Any) -> BatchResult:
    """`submit_batch_file` as an entry point calls it: the submit options, gateway and
    Platform client the test does not give come from the test's environment, read now."""
    settings = load_settings()
    fal = FalConnection(settings)
    given.setdefault("submit_options", SubmitOptions.from_settings(settings))
    given.setdefault("gateway_factory", fal.gateway)
    given.setdefault("platform_factory", fal.platform)
    return submit_batch_file(url, options, **given)


def micros(usd: Decimal | str | int) -> int:
    return int(Decimal(usd) * 1_000_000)


def seedance_720p_micros(seconds: int) -> int:
    """What a Seedance 720p request of `seconds` is estimated at, from the published price."""
    return micros(SEEDANCE_720P_USD_PER_S * seconds)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    return path


def prompts(n: int, *, user_id: int | None = 7, duration: str = "5", tag: str = "p") -> list[dict]:
    rows = []
    for i in range(n):
        row: dict[str, Any] = {
            "prompt": f"{tag} {i}: a red fox in fresh snow",
            "duration": duration,
        }
        if user_id is not None:
            row["user_id"] = user_id
        rows.append(row)
    return rows


def items(conn: psycopg.Connection, batch_id: int | None = None) -> list[dict[str, Any]]:
    where = "" if batch_id is None else "where batch_id = %(b)s"
    return conn.execute(
        f"select * from batch_items {where} order by batch_id, line_no",  # noqa: S608 - constant
        {"b": batch_id},
    ).fetchall()


def ledger_counts(conn: psycopg.Connection) -> tuple[int, int, int]:
    row = conn.execute(
        "select (select count(*) from batches) as b, (select count(*) from batch_items) as i, "
        "(select count(*) from generations) as g"
    ).fetchone()
    return row["b"], row["i"], row["g"]


@contextmanager
def dagster_instance(storage_url: str) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance on its own Postgres database (the `dagster_storage` fixture)."""
    overrides = {"storage": {"postgres": {"postgres_url": storage_url}}}
    with dg.instance_for_test(overrides=overrides) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        yield instance
