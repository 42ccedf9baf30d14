"""One definition of a requested duration: Python's validation and SQL's pricing agree.

The same table of inputs goes through the Python face (validate_request, which refuses or
estimates) and through SQL (rq_parse_duration, and rq_requested_seconds, which prices
completions and raw INSERTs). Each must give the table's answer.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
import pytest
from ledger_helpers import SEEDANCE
from psycopg.types.json import Jsonb

from renderqueue_pipeline.errors import LedgerInputError
from renderqueue_pipeline.ledger import validate_request

MISSING = object()
DEFAULT = "default"  # no seconds asked: the endpoint's default applies

# (duration value, seconds | DEFAULT | the refusal's reason)
TABLE: list[tuple[Any, Any]] = [
    (MISSING, DEFAULT),
    (None, DEFAULT),
    ("auto", DEFAULT),
    (" AUTO ", DEFAULT),
    (5, Decimal(5)),
    (5.5, Decimal("5.5")),
    ("5", Decimal(5)),
    ("5s", Decimal(5)),
    (" 5.5S ", Decimal("5.5")),
    ("+5", Decimal(5)),
    ("15", Decimal(15)),
    (3600, Decimal(3600)),
    ("-5", "must be positive"),
    (0, "must be positive"),
    ("0", "must be positive"),
    (-1, "must be positive"),
    ("3601", "must be at most 3600 s"),
    (1e9, "must be at most 3600 s"),
    ("five", "expected seconds or 'auto'"),
    (".5", "expected seconds or 'auto'"),
    ("5.", "expected seconds or 'auto'"),
    ("1e2", "expected seconds or 'auto'"),
    ("1_000", "expected seconds or 'auto'"),
    ("\u0665", "expected seconds or 'auto'"),  # an Arabic-Indic digit five
    ("5 s", "expected seconds or 'auto'"),
    ("", "expected seconds or 'auto'"),
    ("s", "expected seconds or 'auto'"),
    (True, "expected seconds or 'auto'"),
    ([5], "expected seconds or 'auto'"),
    ({"seconds": 5}, "expected seconds or 'auto'"),
]


def inputs_with(value: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {"prompt": "p", "resolution": "720p"}
    if value is not MISSING:
        inputs["duration"] = value
    return inputs


def default_seconds(conn: psycopg.Connection) -> Decimal:
    return conn.execute(
        "select default_seconds from prices where endpoint = %s and resolution = '720p'",
        (SEEDANCE,),
    ).fetchone()["default_seconds"]


def python_reads(conn: psycopg.Connection, value: Any) -> Any:
    """The seconds validate_request estimates at, or its refusal's reason."""
    try:
        return validate_request(conn, SEEDANCE, inputs_with(value), 1).seconds
    except LedgerInputError as exc:
        assert exc.field == "inputs.duration"  # noqa: PT017 - a helper that returns either answer
        return exc.reason


def sql_reads(conn: psycopg.Connection, value: Any) -> Any:
    """The seconds SQL prices at (rq_requested_seconds, else the default), or the problem."""
    parsed = conn.execute(
        "select seconds, problem, rq_requested_seconds(%(inputs)s) as priced "
        "from rq_parse_duration(%(inputs)s::jsonb -> 'duration')",
        {"inputs": Jsonb(inputs_with(value))},
    ).fetchone()
    assert parsed["priced"] == parsed["seconds"]
    if parsed["problem"] is not None:
        assert parsed["seconds"] is None
        return parsed["problem"]
    return default_seconds(conn) if parsed["seconds"] is None else parsed["seconds"]


@pytest.mark.parametrize(
    ("value", "expected"), TABLE, ids=["missing" if v is MISSING else repr(v) for v, _ in TABLE]
)
def test_python_and_sql_read_a_duration_the_same_way(
    conn: psycopg.Connection, value: Any, expected: Any
) -> None:
    python, sql = python_reads(conn, value), sql_reads(conn, value)
    if expected == DEFAULT:
        expected = default_seconds(conn)
    if isinstance(expected, str):
        assert isinstance(python, str), python
        assert python.startswith(expected), python
        assert isinstance(sql, str), sql
        assert sql.startswith(expected), sql
    else:
        assert python == sql == expected
