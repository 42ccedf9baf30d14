"""Named queries from sql/queries/*.sql: the one place the Python code keeps its SQL.

One file per domain (`ledger.sql`, `batch.sql`, ...); a query name is unique across all
of them, so callers say `q("name")` without knowing the file.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import LiteralString, cast

from renderqueue_pipeline.db.migrate import sql_dir

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@lru_cache(maxsize=1)
def queries() -> dict[str, str]:
    """All named queries of every sql/queries/*.sql file, parsed once per process."""
    named: dict[str, str] = {}
    for path in sorted((sql_dir() / "queries").glob("*.sql")):
        parts = _NAME.split(path.read_text())
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in named:
                raise ValueError(f"query {name!r} is defined twice (again in {path.name})")
            lines = [
                line for line in body.strip().splitlines() if not line.lstrip().startswith("--")
            ]
            named[name] = "\n".join(lines).strip().rstrip(";")
    return named


def q(name: str) -> LiteralString:
    """The SQL text of one named query (KeyError names the missing query).

    Typed `LiteralString` because the text comes from our own sql/ files, never from input:
    that is what psycopg's `execute` asks for to rule out SQL built from data.
    """
    try:
        return cast(LiteralString, queries()[name])
    except KeyError:
        raise KeyError(f"no query named {name!r} in sql/queries/*.sql") from None
