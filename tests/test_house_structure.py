"""The house's structure a newcomer relies on: no import cycles, one definition per helper.

Pure-structure checks (issue 20): the package's import graph is acyclic (demo and dev do
not import each other), money and months are formatted and parsed in one module each,
the budget-skipping submit is private, "reconcile" names only the ledger reconciler, the
batch run's limiter and send marks live in their own modules, and the demo's SQL is named
queries. Plus the helpers' exact output, which the CLI, alerts and docs print.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

import renderqueue_pipeline
from renderqueue_pipeline import ledger
from renderqueue_pipeline.archive import FETCH_POLICY_ENV, FetchPolicy, policy_from_settings
from renderqueue_pipeline.db.queries import queries
from renderqueue_pipeline.defs.archive import resources as archive_resources
from renderqueue_pipeline.money import MICROS_PER_USD, dollars, micros_to_usd, usd, usd_decimal
from renderqueue_pipeline.months import MonthError, month_range, parse_month
from renderqueue_pipeline.settings import load_settings

PACKAGE = Path(renderqueue_pipeline.__file__).parent


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under `root`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Which of the package's modules each module imports (at any level: a function-level
    import still runs), from the source with `ast`; a parent package's implicit import of
    a submodule is not an edge."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (each holds a cycle)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in order:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], order[other])
        if low[node] == order[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return cycles


def test_the_package_has_no_import_cycles() -> None:
    graph = import_graph(PACKAGE)
    assert "renderqueue_pipeline.dev" in graph
    assert "renderqueue_pipeline.demo" in graph
    assert import_cycles(graph) == []
    # the code location's resources import each domain's resources, never the other way
    shared = "renderqueue_pipeline.defs.resources"
    for domain in ("alerts", "archive", "spend"):
        resources = f"renderqueue_pipeline.defs.{domain}.resources"
        assert resources in graph[shared]
        assert shared not in graph[resources]


def test_demo_and_dev_do_not_import_each_other_both_ways() -> None:
    graph = import_graph(PACKAGE)
    demo, dev = "renderqueue_pipeline.demo", "renderqueue_pipeline.dev"
    assert not (dev in graph[demo] and demo in graph[dev])
    # the sample data both use lives in demo_data/, which imports neither
    assert {demo, dev}.isdisjoint(graph["renderqueue_pipeline.demo_data"])


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a two-module and a three-module loop are found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert import_cycles(graph) == [["a", "b"], ["c", "d", "e"]]


def _definitions(root: Path) -> dict[str, list[str]]:
    """Module-level function and class names -> the modules defining them."""
    found: dict[str, list[str]] = {}
    for name, path in _modules(root).items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found.setdefault(node.name, []).append(name)
    return found


@pytest.mark.parametrize(
    ("helper", "home"),
    [
        ("dollars", "renderqueue_pipeline.money"),
        ("usd", "renderqueue_pipeline.money"),
        ("usd_decimal", "renderqueue_pipeline.money"),
        ("micros_to_usd", "renderqueue_pipeline.money"),
        ("cents", "renderqueue_pipeline.money"),
        ("parse_month", "renderqueue_pipeline.months"),
        ("month_range", "renderqueue_pipeline.months"),
        ("month_problem", "renderqueue_pipeline.months"),
        ("AdaptiveLimit", "renderqueue_pipeline.batch.limiter"),
        ("shard_sizes", "renderqueue_pipeline.batch.limiter"),
        ("SendMarks", "renderqueue_pipeline.batch.send_marks"),
        ("FairFeed", "renderqueue_pipeline.batch.feed"),
        ("WaitingGate", "renderqueue_pipeline.batch.feed"),
        ("is_rate_limited", "renderqueue_pipeline.batch.fal_answers"),
        ("is_definite_rejection", "renderqueue_pipeline.batch.fal_answers"),
        ("drop_sample_prompts", "renderqueue_pipeline.demo_data"),
        ("check_billing", "renderqueue_pipeline.spend.billing_check"),
    ],
)
def test_each_helper_is_defined_once(helper: str, home: str) -> None:
    assert _definitions(PACKAGE).get(helper) == [home]


def test_no_module_keeps_a_private_copy_of_the_money_or_month_helpers() -> None:
    """The old private copies (focus's `_usd`, single submit's `_definite`) are gone."""
    copies = {
        name: modules
        for name, modules in _definitions(PACKAGE).items()
        if name in {"_usd", "_dollars", "_parse_month", "_month_range", "_definite"}
    }
    assert copies == {}


def test_the_budget_skipping_submit_is_not_public() -> None:
    for name in ("submit_generation", "asubmit_generation"):
        assert name not in ledger.__all__
        assert not hasattr(ledger, name)


def test_reconcile_names_only_the_ledger_reconciler() -> None:
    assert importlib.util.find_spec("renderqueue_pipeline.reconcile") is not None
    assert importlib.util.find_spec("renderqueue_pipeline.spend.reconcile") is None
    assert importlib.util.find_spec("renderqueue_pipeline.spend.billing_check") is not None


def _string_sql(path: Path) -> list[str]:
    """String constants in a module that read like SQL statements."""
    keywords = ("select ", "insert ", "update ", "delete ", "with ")
    return [
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.lstrip().lower().startswith(keywords)
    ]


@pytest.mark.parametrize("module", ["demo.py", "dev.py", "demo_data/__init__.py"])
def test_the_demo_keeps_no_inline_sql(module: str) -> None:
    assert _string_sql(PACKAGE / module) == []


def test_the_demo_queries_are_named_queries() -> None:
    demo_sql = (Path(__file__).parents[1] / "sql" / "queries" / "demo.sql").read_text()
    named = queries()
    for name in ("demo_summary_by_status", "demo_sample_batches", "demo_budget_exists"):
        assert f"-- name: {name}\n" in demo_sql
        assert name in named


# -- the helpers' exact text (the CLI, alerts, reports and docs print these) ------------


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "$0.000000"),
        (1, "$0.000001"),
        (-1, "-$0.000001"),
        (49_990_000, "$49.990000"),
        (-3_034_000, "-$3.034000"),
        (1_234_567_891_234, "$1,234,567.891234"),
        (Decimal(2_500_000), "$2.500000"),
    ],
)
def test_dollars_are_exact_to_the_micro_dollar(micros: int, text: str) -> None:
    assert dollars(micros) == text


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (None, "no cap"),
        (0, "$0.00"),
        (12_500_000, "$12.50"),
        (20_000_000, "$20.00"),
        (1_234_567, "$1.234567"),
        (1_230_000, "$1.23"),
        (1_234_500_000_000, "$1,234,500.00"),
        (-1_500_000, "$-1.50"),
    ],
)
def test_short_dollars_keep_cents_and_drop_only_trailing_zeros(
    micros: int | None, text: str
) -> None:
    assert usd(micros) == text


def test_dollar_numbers_for_exports_and_plots() -> None:
    assert MICROS_PER_USD == 1_000_000
    assert usd_decimal(1_234_567) == Decimal("1.234567")
    assert str(usd_decimal(5_000_000)) == "5.000000"
    assert usd_decimal(None) is None
    assert micros_to_usd(2_500_000) == 2.5


@pytest.mark.parametrize(
    ("text", "month"),
    [
        ("2026-03", date(2026, 3, 1)),
        (" 2026-12 ", date(2026, 12, 1)),
        ("2026-03-01", date(2026, 3, 1)),  # a Dagster monthly partition key
        (date(2026, 3, 17), date(2026, 3, 1)),
        ("0001-01", date(1, 1, 1)),
        ("9998-12", date(9998, 12, 1)),
    ],
)
def test_a_month_parses_from_text_a_partition_key_or_a_date(text: str | date, month: date) -> None:
    assert parse_month(text) == month


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026/03", "--month: expected YYYY-MM, e.g. 2026-03 (got '2026/03')"),
        ("2026-3", "--month: expected YYYY-MM, e.g. 2026-03 (got '2026-3')"),
        ("2026-03-02", "--month: expected YYYY-MM, e.g. 2026-03 (got '2026-03-02')"),
        ("2031-13", "--month: expected YYYY-MM: month must be 01-12 (got '2031-13')"),
        ("0000-01", "--month: expected YYYY-MM: year must be 0001-9998 (got '0000-01')"),
        ("9999-12", "--month: expected YYYY-MM: year must be 0001-9998 (got '9999-12')"),
    ],
)
def test_a_bad_month_is_one_error_naming_the_setting(text: str, message: str) -> None:
    with pytest.raises(MonthError) as caught:
        parse_month(text)
    assert str(caught.value) == message
    assert caught.value.setting == "--month"
    with pytest.raises(MonthError, match=r"^month: "):
        parse_month(text, "month")


def test_a_month_range_is_utc_midnight_to_the_next_months() -> None:
    assert month_range(date(2026, 12, 1)) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )


TESTS = Path(__file__).resolve().parent

#: The modules that set settings up for tests (`settings_env`, `ledger_env`, `archive_root`,
#: `patched_settings` in conftest; the simulator plugin, which cannot depend on conftest).
SETTINGS_FIXTURE_HOMES = frozenset({"conftest.py", "fal_sim_plugin.py"})


def settings_cache_clears(source: str) -> list[int]:
    """Lines that name `get_settings.cache_clear` (called, or handed to a finalizer)."""
    return sorted(
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and node.attr == "cache_clear"
        and (
            (isinstance(node.value, ast.Name) and node.value.id == "get_settings")
            or (isinstance(node.value, ast.Attribute) and node.value.attr == "get_settings")
        )
    )


def test_tests_set_settings_up_through_the_fixtures_only() -> None:
    """A test sets settings with `settings_env` (or a fixture built on it), never by
    clearing the cached Settings itself: a hand-written clear is easy to forget on the
    way out, and then one test's values leak into the next."""
    found = [
        f"{path.name}:{line}"
        for path in sorted(TESTS.glob("*.py"))
        if path.name not in SETTINGS_FIXTURE_HOMES
        for line in settings_cache_clears(path.read_text())
    ]
    assert found == []


def test_the_settings_clear_finder_finds_each_spelling() -> None:
    """The check above can fail: a call, a finalizer and a module-qualified name."""
    source = (
        "get_settings.cache_clear()\n"
        "request.addfinalizer(get_settings.cache_clear)\n"
        "settings.get_settings.cache_clear()\n"
        "other.cache_clear()\n"
    )
    assert settings_cache_clears(source) == [1, 2, 3]


def unlocked_dev_login_tests(source: str) -> list[str]:
    """Test functions that call `running_stack` or `dev_logins` (both give the server-wide
    dev logins new passwords) without requesting the `dev_logins_lock` fixture."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
            continue
        called = {
            call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", "")
            for call in ast.walk(node)
            if isinstance(call, ast.Call)
        }
        if called & {"running_stack", "dev_logins"} and "dev_logins_lock" not in {
            arg.arg for arg in node.args.args
        }:
            found.append(node.name)
    return found


def test_tests_that_set_the_dev_logins_passwords_take_turns() -> None:
    """Two pytest-xdist workers share one Postgres server and its dev logins: a stack whose
    passwords another worker reset fails to connect (test_production_shape under -n 2)."""
    found = [
        f"{path.name}::{name}"
        for path in sorted(TESTS.glob("test_*.py"))
        for name in unlocked_dev_login_tests(path.read_text())
    ]
    assert found == []


def test_the_dev_logins_check_finds_a_test_without_the_lock() -> None:
    source = (
        "def test_a(tmp_path):\n    with running_stack(tmp_path): pass\n"
        "def test_b(ledger_url, dev_logins_lock):\n    dev_logins(ledger_url)\n"
        "def test_c(url):\n    roles.dev_logins(url)\n"
        "def test_d(url):\n    grant_login(url)\n"
    )
    assert unlocked_dev_login_tests(source) == ["test_a", "test_c"]


def test_the_archive_fetch_policy_is_built_through_one_mapping(
    settings_env: Callable[..., None],
) -> None:
    """The CLI's policy (`policy_from_settings`) and the Dagster resource's are one policy
    for one environment: both go through FETCH_POLICY_ENV, and the resource's module names
    none of its variables itself."""
    settings_env(
        RENDERQUEUE_ARCHIVE_HOSTS="a.example, B.example",
        RENDERQUEUE_ARCHIVE_LOOPBACK_HOSTS="127.0.0.1:9",
        FAL_QUEUE_RUN_HOST="127.0.0.1:8",
        RENDERQUEUE_ARCHIVE_MAX_BYTES="1234",
        RENDERQUEUE_ARCHIVE_MIN_BYTES_PER_SECOND="99.5",
        RENDERQUEUE_ARCHIVE_STALL_SECONDS="7",
    )
    settings = load_settings()
    policy = archive_resources.ArchiveResource.from_settings(settings).setup().policy
    assert policy == policy_from_settings(settings)
    assert policy == FetchPolicy(
        allowed_hosts=frozenset({"a.example", "b.example"}),
        loopback_hosts=frozenset({"127.0.0.1:9", "127.0.0.1:8"}),
        max_bytes=1234,
        min_bytes_per_second=99.5,
        stall_seconds=7.0,
    )
    source = Path(archive_resources.__file__).read_text()
    assert [name for name in FETCH_POLICY_ENV.values() if name in source] == []
