"""The README tells the truth: its commands exist and parse, read-only ones run, and the
analysts' example queries run against the real schema."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import psycopg
import pytest
from click.testing import CliRunner

from renderqueue_pipeline.cli import main

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
PLACEHOLDERS = {
    "BATCH_ID": "1",
    "REQUEST_ID": "req-1",
    "YYYY-MM": "2026-11",
    "FILE": "prompts.csv",
    "MONTH": "2026-11",
}
READ_ONLY = {
    ("db", "url"),
    ("db", "status"),
    ("events", "waiting"),
    ("report",),
    ("budget", "show"),
    ("batch", "list"),
}


def readme_commands() -> list[str]:
    """Every `renderqueue ...` the README shows, in code blocks or inline code."""
    found: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            found += re.findall(r"renderqueue [^`\"\)]+", line)
    found += re.findall(r"`(renderqueue [^`]+)`", README)
    return sorted({c.strip() for c in found})


def resolve(argv: list[str]) -> tuple[click.Command, list[str], tuple[str, ...]]:
    """The click command an argv names, the arguments left for it, and its path."""
    command: click.Command = main
    path: list[str] = []
    while isinstance(command, click.Group) and argv and not argv[0].startswith("-"):
        sub = command.get_command(click.Context(command), argv[0])
        assert sub is not None, (
            f"README names `renderqueue {' '.join(path + argv)}`: no such command"
        )
        command, path, argv = sub, [*path, argv[0]], argv[1:]
    return command, argv, tuple(path)


COMMANDS = readme_commands()


def test_the_readme_shows_the_commands_users_need() -> None:
    paths = {resolve(shlex.split(c)[1:])[2] for c in COMMANDS}
    for needed in [
        ("dev",),
        ("demo",),
        ("db", "url"),
        ("reconcile",),
        ("batch", "cancel"),
        ("budget", "set"),
        ("events", "waiting"),
        ("spend", "reconcile"),
        ("report",),
        ("archive",),
        ("link",),
    ]:
        assert needed in paths, needed


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_exists_and_its_options_parse(command: str) -> None:
    argv = [PLACEHOLDERS.get(a, a) for a in shlex.split(command)[1:]]
    target, rest, path = resolve(argv)
    if not rest:
        return  # a mention of the command in prose: existing is all it claims
    # make_context parses options and arguments exactly as a real call would, and raises
    # click's usage error on an option or argument the command does not have
    with target.make_context(" ".join(["renderqueue", *path]), list(rest)):
        pass


@pytest.mark.parametrize(
    "command",
    [
        c
        for c in COMMANDS
        if resolve(shlex.split(c)[1:])[2] in READ_ONLY
        and (len(shlex.split(c)) > 2 or resolve(shlex.split(c)[1:])[2] != ("report",))
    ],
)
def test_read_only_readme_commands_run(command: str, ledger_env: str) -> None:
    argv = [PLACEHOLDERS.get(a, a) for a in shlex.split(command)[1:]]
    result = CliRunner().invoke(main, argv, catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("query", re.findall(r"```sql\n(.*?)```", README, flags=re.S))
def test_the_analysts_example_queries_run_on_the_schema(
    query: str, conn: psycopg.Connection
) -> None:
    conn.execute(query).fetchall()
