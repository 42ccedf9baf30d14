"""`make bench`: run the benchmarks, print a table of ratios, write docs/BENCHMARKS.md.

Every figure is compared with a baseline measured in the same run on the same machine, so
the ratio means something on a shared, noisy machine where absolute numbers do not. Each
benchmark runs in its own process (and process group), so one benchmark's memory, caches
and leftover servers cannot change the next; between benchmarks the database server is
checkpointed and vacuumed, and the load average is recorded at the start and the end of
each. docs/BENCHMARKS.md is this run's output, written whole: nothing in it by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.common import REPEATS, SCALE, Figure, bench_server_url, note


def _discover() -> list[str]:
    """Every bench/<name>.py that defines `run(console)` is a benchmark (ledger first)."""
    here = Path(__file__).resolve().parent
    found = [
        p.stem
        for p in sorted(here.glob("*.py"))
        if not p.stem.startswith("_") and "\ndef run(" in p.read_text()
    ]
    return sorted(found, key=lambda name: (name != "ledger", name))


BENCHMARKS = _discover()
REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "BENCHMARKS.md"
CHILD_TIMEOUT_S = 3600


@dataclass
class Section:
    """One benchmark's run: its figures and the conditions it ran under."""

    name: str
    note: str
    started: datetime
    seconds: float = 0.0
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and all(f.ok for f in self.figures)


def _doc(name: str) -> str:
    module = importlib.import_module(f"bench.{name}")
    return (module.__doc__ or name).strip()


def settle_database(console: Console) -> None:
    """Checkpoint and vacuum the server: no benchmark pays for the last one's writes."""

    try:
        with psycopg.connect(bench_server_url(), autocommit=True) as conn:
            conn.execute("checkpoint")
            conn.execute("vacuum")
    except Exception as exc:  # noqa: BLE001 - a benchmark can still run; say why it was not settled
        console.print(f"[yellow]could not checkpoint the benchmark server: {escape(str(exc))}")


def run_one_in_child(name: str, console: Console) -> Section:
    """Run one benchmark in a fresh interpreter and process group; collect its figures."""
    section = Section(name=name, note=_doc(name), started=datetime.now(UTC))
    settle_database(console)
    section.load_start = os.getloadavg()
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        out_path = Path(out.name)
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", "--one", name, "--json", str(out_path)],
        cwd=REPO,
        start_new_session=True,  # its own group: whatever it leaves running is stopped below
    )
    try:
        code = process.wait(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    section.seconds = time.perf_counter() - started
    section.load_end = os.getloadavg()
    if code is None:
        section.error = f"did not finish within {CHILD_TIMEOUT_S} s"
    elif code != 0 or not out_path.stat().st_size:
        section.error = f"exited with status {code}"
    else:
        found = json.loads(out_path.read_text())
        section.figures = [Figure(**f) for f in found["figures"]]
        section.notes = found["notes"]
    out_path.unlink(missing_ok=True)
    console.print(
        f"[bold]{name}[/bold] took {section.seconds:.0f} s "
        f"(load average {_load(section.load_start)} -> {_load(section.load_end)})"
    )
    return section


def _one(name: str, json_path: Path) -> int:
    """Child mode: run one benchmark and write its figures as JSON."""
    module = importlib.import_module(f"bench.{name}")
    console = Console()
    console.print(f"[bold]running {name}[/bold]: {escape(_doc(name).splitlines()[0])}")
    figures = module.run(console)
    json_path.write_text(
        json.dumps({"figures": [dataclasses.asdict(f) for f in figures], "notes": note.lines})
    )
    return 0


def _load(values: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def render_markdown(sections: list[Section]) -> str:
    first = min(s.started for s in sections)
    total = sum(s.seconds for s in sections)
    lines = [
        "# Benchmarks",
        "",
        "Written whole by `make bench` (`python -m bench`): this file is one run's output,",
        "nothing in it by hand. Every figure is a ratio against a baseline measured in the",
        "same run, because absolute numbers on a shared machine drift. Each benchmark ran in",
        "its own process after a checkpoint and vacuum of the database server; the load",
        "average (1 / 5 / 15 min) is the machine's at the start and the end of each.",
        "A moonshot is a ratio worth reaching: shown, not enforced. A figure whose ratio",
        f"swung across its bar between runs is measured {REPEATS} times, taking turns with its",
        "baseline: the table compares the medians and lists every run's value beside them.",
        "",
        f"Run: {first:%Y-%m-%d %H:%M} UTC, {total / 60:.1f} minutes in all, on "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        + (f", at scale {SCALE:g} (`make bench-quick`)" if SCALE != 1 else "")
        + f". Result: {'every bar held' if all(s.ok for s in sections) else 'BARS MISSED'}.",
        "",
    ]
    for s in sections:
        lines += [
            f"## {s.name}",
            "",
            s.note,
            "",
            f"`python -m bench {s.name}` — {s.started:%H:%M} UTC, {s.seconds:.0f} s, "
            f"load average {_load(s.load_start)} at the start, {_load(s.load_end)} at the end.",
            "",
        ]
        if s.error:
            lines += [f"**Failed: {s.error}.**", ""]
            continue
        lines += [
            "| figure | value | baseline | baseline value | ratio | required | ok | moonshot |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for f in s.figures:
            lines.append(
                f"| {f.name} | {f.value_text()} | {f.baseline_name} | "
                f"{f.baseline_text()} | {f.ratio:.2f}x | "
                f"{f.requirement} | {'yes' if f.ok else 'NO'} | {f.moonshot_text} |"
            )
        lines.append("")
        if s.notes:
            lines += ["Measured in this run:", "", "```text", *s.notes, "```", ""]
    return "\n".join(lines)


def print_table(console: Console, sections: list[Section]) -> None:
    table = Table(title="renderqueue benchmarks (ratios against same-run baselines)")
    for column in ("benchmark", "figure", "value", "baseline", "ratio", "required", "ok", "moon"):
        table.add_column(column)
    for s in sections:
        if s.error:
            table.add_row(s.name, escape(s.error), "", "", "", "", "NO", "")
        for f in s.figures:
            table.add_row(
                s.name,
                escape(f.name),
                escape(f.value_text()),
                escape(f"{f.baseline_name}: {f.baseline_text()}"),
                f"{f.ratio:.2f}x",
                f.requirement,
                "yes" if f.ok else "NO",
                f.moonshot_text,
            )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", default=BENCHMARKS, help=f"any of {BENCHMARKS}")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    parser.add_argument(
        "--markdown",
        type=Path,
        help="also write this run's docs/BENCHMARKS.md to this path (any scale, any subset)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return _one(args.one, args.json)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)}; there are {BENCHMARKS}")
    console = Console()
    started = time.perf_counter()
    sections = [run_one_in_child(name, console) for name in args.names]
    print_table(console, sections)
    console.print(
        f"{len(sections)} benchmark(s) in {(time.perf_counter() - started) / 60:.1f} minutes"
        + (f" at scale {SCALE:g} (bars shown, not enforced)" if SCALE != 1 else "")
    )
    # A run at another scale, or of some benchmarks only, is never the file's record.
    if not args.no_write and SCALE == 1 and args.names == BENCHMARKS:
        OUT.write_text(render_markdown(sections))
        console.print(f"wrote {OUT}")
    if args.markdown:
        args.markdown.write_text(render_markdown(sections))
        console.print(f"wrote {args.markdown}")
    return exit_status(sections, SCALE)


def exit_status(sections: list[Section], scale: float) -> int:
    """1 when a benchmark failed, or (at full size only) a bar was missed.

    The bars are set for the full size: at a tenth of it fixed costs (process start-ups,
    one-off set-up) weigh ten times as much and some baselines shrink to a few rows, so a
    scaled run (`make bench-quick`) checks that every benchmark runs and its results are
    right, and shows the ratios without enforcing them.
    """
    if any(s.error for s in sections):
        return 1
    if scale != 1:
        return 0
    return 0 if all(s.ok for s in sections) else 1


if __name__ == "__main__":
    sys.exit(main())
