"""`make bench`: run the benchmarks, print a table of ratios, write docs/BENCHMARKS.md.

Every figure is compared with a baseline measured in the same run on the same machine, so
the ratio means something on a shared, noisy machine where absolute numbers do not.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import Figure


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
OUT = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def render_markdown(results: dict[str, list[Figure]], notes: dict[str, str]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Measured by `make bench` (`python -m bench`); every figure is a ratio against a",
        "baseline measured in the same run, because absolute numbers on a shared machine drift.",
        f"Last run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, "
        f"{__import__('os').cpu_count()} cores, Python {platform.python_version()}.",
        "",
    ]
    for name, figures in results.items():
        lines += [f"## {name}", "", notes.get(name, ""), ""]
        lines += [
            "| figure | value | baseline | baseline value | ratio | required | ok |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in figures:
            lines.append(
                f"| {f.name} | {f.value:,.1f} {f.unit} | {f.baseline_name} | "
                f"{f.baseline_value:,.1f} {f.unit} | {f.ratio:.2f}x | "
                f"{f.requirement} | {'yes' if f.ok else 'NO'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", default=BENCHMARKS, help=f"any of {BENCHMARKS}")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    console = Console()
    results: dict[str, list[Figure]] = {}
    notes: dict[str, str] = {}
    for name in args.names:
        module = importlib.import_module(f"bench.{name}")
        console.print(f"[bold]running {name}[/bold]: {module.__doc__.strip().splitlines()[0]}")
        results[name] = module.run(console)
        notes[name] = module.__doc__.strip()
    table = Table(title="renderqueue benchmarks (ratios against same-run baselines)")
    for column in ("benchmark", "figure", "value", "baseline", "ratio", "required", "ok"):
        table.add_column(column)
    for name, figures in results.items():
        for f in figures:
            table.add_row(
                name,
                f.name,
                f"{f.value:,.1f} {f.unit}",
                f"{f.baseline_name}: {f.baseline_value:,.1f}",
                f"{f.ratio:.2f}x",
                f.requirement,
                "yes" if f.ok else "NO",
            )
    console.print(table)
    if not args.no_write:
        OUT.write_text(render_markdown(results, notes))
        console.print(f"wrote {OUT}")
    return 0 if all(f.ok for figures in results.values() for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
