"""The docs point at code that exists: files, links, modules and SQL functions they name.

Files move (a refactor splits a module, renames a folder); prose does not follow by itself.
These tests read README.md, docs/*.md and every other README in the repository and fail
naming the document and the stale name, so a move that leaves a doc behind shows in review.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import click
import pytest

from renderqueue_pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "renderqueue_pipeline"
DOCS = sorted(
    {
        ROOT / "README.md",
        *ROOT.glob("docs/**/*.md"),
        *ROOT.glob("deploy/**/*.md"),
        *PACKAGE.glob("**/*.md"),
    }
)
ARCHITECTURE = ROOT / "docs" / "architecture.md"

#: Folders a path may start from: the repository's top level, or the package (docs say
#: `defs/shared.py` for `renderqueue_pipeline/defs/shared.py`).
TOP_LEVEL = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
PACKAGE_LEVEL = {p.name for p in PACKAGE.iterdir() if not p.name.startswith(("_", "."))}
#: Repository folders whose name alone says "this repository" (a path under them with no
#: extension is a folder that must exist); package folders need an extension or a slash.
UNAMBIGUOUS = {"renderqueue_pipeline", "sql", "tests", "docs", "bench", "deploy"}
#: Object keys in storage, not files of the repository (docs/reports.md, docs/archive.md).
STORAGE_KEYS = ("reports/spend/", "generations/YYYY/")

PATH = re.compile(r"(?<![\w./$:@~-])((?:[A-Za-z0-9_.-]+/)+[A-Za-z0-9_.*-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
MODULE = re.compile(r"\brenderqueue_pipeline(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
SQL_CALL = re.compile(r"\b(rq_[a-z0-9_]+)\(")
#: "`rq_next` in `sql/functions/ledger.sql`" or "`refresh_month` (`reports/spend.py`)".
SYMBOL_IN_FILE = re.compile(
    r"`([A-Za-z_][A-Za-z0-9_]*)(?:\(\))?`"
    r"(?: in `([^`\s]+\.(?:py|sql))`| \(`([^`\s]+\.(?:py|sql))`\))"
)
#: SQL types a doc may place beside the file that uses them: not definitions.
SQL_TYPES = {"bigint", "integer", "numeric", "text", "jsonb", "date", "timestamptz", "interval"}
TEST_ID = re.compile(r"\b(tests/[A-Za-z0-9_/]+\.py)::([A-Za-z_][A-Za-z0-9_]*)")


COMMAND_SPAN = re.compile(r"`(renderqueue [^`]+)`")
CODE_BLOCK = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)


def _id(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def _resolve(name: str) -> Path | None:
    """The file or folder a doc's path names, from the repository or the package root."""
    for base in (ROOT, PACKAGE):
        if "*" in name:
            if any(base.glob(name)):
                return base
        elif (base / name).exists():
            return base / name
    return None


def named_paths(text: str) -> list[str]:
    """Every repository path a document names, in prose, code spans or code blocks."""
    found = []
    for match in PATH.finditer(text):
        name = match.group(1).rstrip(".")
        first, last = name.split("/", 1)[0], name.rsplit("/", 1)[1]
        if first not in TOP_LEVEL | PACKAGE_LEVEL or name.startswith(STORAGE_KEYS):
            continue
        if last and "." not in last and first not in UNAMBIGUOUS:
            continue  # `batch/submit` in prose is a phrase, `batch/submit.py` a file
        found.append(name)
    return found


def headings(doc: Path) -> set[str]:
    """GitHub's anchors for a document's headings."""
    anchors = set()
    in_code = False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        title = re.sub(r"[^\w\- ]", "", title)
        anchors.add(title.replace(" ", "-"))
    return anchors


def sql_definitions(name: str) -> list[Path]:
    """The files under sql/schema and sql/functions that define the function or procedure."""
    pattern = re.compile(
        rf"create\s+(?:or\s+replace\s+)?(?:function|procedure)\s+{name}\s*\(", re.I
    )
    return [
        f
        for f in sorted((ROOT / "sql").glob("*/*.sql"))
        if f.parent.name in {"schema", "functions"} and pattern.search(f.read_text())
    ]


def defines(path: Path, symbol: str) -> bool:
    """Whether a Python or SQL file defines `symbol` (not merely mentions it)."""
    text = path.read_text()
    if path.suffix == ".py":
        pattern = rf"^\s*(?:async\s+def|def|class)\s+{symbol}\b|^{symbol}\s*[:=]"
    else:
        pattern = (
            rf"(?:function|procedure|trigger|table|view|type)\s+(?:if\s+not\s+exists\s+)?{symbol}\b"
            rf"|^--\s*name:\s*{symbol}\b"
        )
    return re.search(pattern, text, flags=re.M | re.I) is not None


def test_the_scan_finds_repository_paths_and_skips_other_slashes() -> None:
    """The checks below are only as good as what the scan picks out of prose."""
    text = (
        "See `renderqueue_pipeline/defs/shared.py`, defs/batch/jobs.py and sql/functions/; "
        "files land in reports/spend/YYYY-MM/ and $RENDERQUEUE_HOME/pg; read and/or write "
        "batch/submit, or https://example.com/docs/x.md."
    )
    assert named_paths(text) == [
        "renderqueue_pipeline/defs/shared.py",
        "defs/batch/jobs.py",
        "sql/functions/",
    ]
    assert _resolve("defs/shared.py") == PACKAGE / "defs" / "shared.py"
    assert _resolve("defs/no_such_module.py") is None


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_every_file_a_doc_names_exists(doc: Path) -> None:
    missing = sorted({p for p in named_paths(doc.read_text()) if _resolve(p) is None})
    assert not missing, f"{_id(doc)} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_every_link_in_a_doc_reaches_its_file_and_heading(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        name, _, anchor = target.partition("#")
        linked = (doc.parent / name).resolve() if name else doc
        heading_missing = linked.suffix == ".md" and anchor and anchor not in headings(linked)
        if not linked.exists() or heading_missing:
            broken.append(target)
    assert not broken, f"{_id(doc)} links to missing files or headings: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_every_module_a_doc_names_imports(doc: Path) -> None:
    """`renderqueue_pipeline.x.y` in a doc is a module, or a module and its attribute."""
    missing = []
    for dotted in sorted(set(MODULE.findall(doc.read_text()))):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                target = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            try:
                for attribute in parts[cut:]:
                    target = getattr(target, attribute)
            except AttributeError:
                missing.append(dotted)
            break
        else:
            missing.append(dotted)
    assert not missing, f"{_id(doc)} names modules or attributes that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_every_sql_function_a_doc_calls_has_one_definition(doc: Path) -> None:
    wrong = {
        name: [str(f.relative_to(ROOT)) for f in files]
        for name in sorted(set(SQL_CALL.findall(doc.read_text())))
        if len(files := sql_definitions(name)) != 1
    }
    assert not wrong, f"{_id(doc)}: SQL functions without exactly one definition: {wrong}"


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_a_doc_that_says_where_a_name_is_defined_is_right(doc: Path) -> None:
    """ "`rq_next` in `sql/functions/ledger.sql`", "tests/x.py::test_y": the file defines it."""
    wrong = []
    for symbol, in_name, beside_name in SYMBOL_IN_FILE.findall(doc.read_text()):
        if symbol in SQL_TYPES:
            continue
        name = in_name or beside_name
        if "/" in name:
            candidates = [p for p in [_resolve(name)] if p is not None and p.is_file()]
        else:  # `billing.py` in a row about renderqueue_pipeline/spend/: any file so named
            candidates = [*PACKAGE.rglob(name), *(ROOT / "sql").rglob(name)]
        if not any(defines(path, symbol) for path in candidates):
            wrong.append(f"{symbol} in {name}")
    for name, test in TEST_ID.findall(doc.read_text()):
        path = ROOT / name
        if not path.is_file() or not defines(path, test):
            wrong.append(f"{name}::{test}")
    assert not wrong, f"{_id(doc)} places names in files that do not define them: {wrong}"


def named_commands(text: str) -> list[str]:
    """`renderqueue ...` in code spans, and lines of code blocks that run one."""
    found = COMMAND_SPAN.findall(CODE_BLOCK.sub("", text))
    for block in CODE_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip().removeprefix("$ ")
            if line.startswith("renderqueue "):
                found.append(line)
    # "renderqueue db ..." is a gesture, not a command
    return [c.strip() for c in found if not re.search(r"\.\.\.|…|[<>|]", c)]


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_every_command_and_option_a_doc_names_exists(doc: Path) -> None:
    wrong = []
    for command in sorted(set(named_commands(doc.read_text()))):
        argv = shlex.split(command)[1:]
        found: click.Command = main
        while isinstance(found, click.Group) and argv and not argv[0].startswith("-"):
            sub = found.get_command(click.Context(found), argv[0])
            if sub is None:
                wrong.append(command)
                break
            found, argv = sub, argv[1:]
        options = {o for p in found.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        wrong += [
            f"{command}: {a}" for a in argv if a.startswith("--") and a.split("=")[0] not in options
        ]
    assert not wrong, f"{_id(doc)} names commands or options that do not exist: {wrong}"


def test_the_readme_links_the_architecture_page_first() -> None:
    """A newcomer meets docs/architecture.md before any other page of docs/."""
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"\]\((docs/[^)#\s]+)", readme)
    assert ARCHITECTURE.exists()
    assert first is not None
    assert first.group(1) == "docs/architecture.md"


def test_the_architecture_page_names_the_one_place_of_each_rule() -> None:
    text = ARCHITECTURE.read_text()
    table = text.split("## Where each rule lives", 1)[1].split("\n## ", 1)[0]
    rows = {
        cells[1].strip().lower(): cells[2]
        for line in table.splitlines()
        if line.startswith("|") and len(cells := line.split("|")) > 3
    }
    for rule in [
        "ledger state machine",
        "prices",
        "budgets",
        "months",
        "money formatting",
        "signature verification",
        "ssrf and allow-lists",
        "query names",
        "migrations",
    ]:
        assert rule in rows, f"no row for {rule!r} in the rule table"
        assert named_paths(rows[rule]), f"the row for {rule!r} names no file"


def floors() -> list[tuple[str, set[str]]]:
    """The floors of docs/architecture.md, top first: each with the modules it names."""
    table = ARCHITECTURE.read_text().split("## The floors", 1)[1].split("\n## ", 1)[0]
    found = []
    for line in table.splitlines():
        cells = line.split("|")
        if not line.startswith("|") or len(cells) < 5 or set(cells[1].strip()) <= {"-"}:
            continue
        modules = {
            p.removeprefix("renderqueue_pipeline/").removesuffix(".py").strip("/").replace("/", ".")
            for p in named_paths(cells[3])
            if p.startswith("renderqueue_pipeline/")
        }
        if modules:
            found.append((cells[1].strip(), modules))
    return found


def package_imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (anywhere in it)."""
    imports = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            targets |= {
                n.removeprefix("renderqueue_pipeline.")
                for n in names
                if n.startswith("renderqueue_pipeline.")
            }
        imports[module] = targets
    return imports


def floor_of(module: str, levels: list[tuple[str, set[str]]]) -> int | None:
    """The floor whose longest named prefix holds `module` (a file beats its folder)."""
    holders = [
        (len(prefix), index)
        for index, (_, prefixes) in enumerate(levels)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    return max(holders)[1] if holders else None


#: Beside the floors (docs/architecture.md): the fal stand-in and the sample data.
BESIDE = ("simulator", "demo_data")


def test_every_module_stands_on_a_floor_the_architecture_page_names() -> None:
    levels = floors()
    assert [name for name, _ in levels] == [
        "entry points",
        "Dagster definitions",
        "domains",
        "core",
        "ground",
    ]
    homeless = [
        m
        for m in package_imports()
        if m and not m.startswith(BESIDE) and floor_of(m, levels) is None
    ]
    assert not homeless, f"modules on no floor of docs/architecture.md: {homeless}"


def test_imports_point_down_the_floors() -> None:
    """A floor imports from its own floor and the ones below; the simulator only from the
    entry points (the product reaches it through the environment)."""
    levels = floors()
    upward = []
    for module, targets in package_imports().items():
        if not module or module.startswith(BESIDE):
            continue
        mine = floor_of(module, levels)
        for target in targets:
            if target.startswith("simulator"):
                if mine != 0:
                    upward.append(f"{module} -> {target}")
                continue
            theirs = floor_of(target, levels)
            if mine is not None and theirs is not None and theirs < mine:
                upward.append(f"{module} ({levels[mine][0]}) -> {target} ({levels[theirs][0]})")
    assert not upward, f"imports that point up the floors: {sorted(upward)}"
