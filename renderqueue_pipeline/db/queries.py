"""Named queries from sql/queries.sql: the one place the Python code keeps its SQL."""

from __future__ import annotations

import re
from functools import lru_cache

from renderqueue_pipeline.db.migrate import sql_dir

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@lru_cache(maxsize=1)
def queries() -> dict[str, str]:
    """All named queries, parsed once per process."""
    text = (sql_dir() / "queries.sql").read_text()
    parts = _NAME.split(text)
    named: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        named[name] = "\n".join(lines).strip().rstrip(";")
    return named


def q(name: str) -> str:
    """The SQL text of one named query (KeyError names the missing query)."""
    try:
        return queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in sql/queries.sql") from None
