"""The named queries in sql/queries/*.sql, and where the code uses them.

A query name is spelled out where it is used, `q("monthly_by_user")`, never computed
(`q(f"monthly_by_{by}")`): grepping for a name finds every caller, and a query no caller
names is dead SQL a reader would still have to understand. Read from the source, not by
running it, so a branch no test reaches counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from renderqueue_pipeline.db.queries import queries

ROOT = Path(__file__).resolve().parent.parent
CODE = [
    *sorted((ROOT / "renderqueue_pipeline").rglob("*.py")),
    *sorted((ROOT / "bench").rglob("*.py")),
]


def _q_calls() -> list[tuple[Path, int, ast.expr]]:
    """Every call of `q(...)` in the package and the benchmarks: (file, line, argument)."""
    calls = []
    for path in CODE:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "q"
                and node.args
            ):
                calls.append((path.relative_to(ROOT), node.lineno, node.args[0]))
    return calls


def test_every_query_name_is_spelled_out_where_it_is_used() -> None:
    computed = [
        f"{path}:{line}: q({ast.unparse(arg)})"
        for path, line, arg in _q_calls()
        if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str))
    ]
    assert computed == [], "query names must be literal strings:\n" + "\n".join(computed)


def test_every_name_the_code_uses_is_a_named_query() -> None:
    known = set(queries())
    missing = [
        f"{path}:{line}: {arg.value!r}"
        for path, line, arg in _q_calls()
        if isinstance(arg, ast.Constant) and arg.value not in known
    ]
    assert missing == [], "no such query in sql/queries/*.sql:\n" + "\n".join(missing)


def test_every_named_query_is_used_by_its_name() -> None:
    used = {
        arg.value
        for _, _, arg in _q_calls()
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    }
    unused = sorted(set(queries()) - used)
    assert unused == [], "named queries no code uses (delete them): " + ", ".join(unused)
