"""What every benchmark shares: the figure type, repeated measurements, notes for the
generated docs/BENCHMARKS.md, and a throw-away ledger database."""

from __future__ import annotations

import os
import statistics
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from rich.console import Console

from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.db.server import embedded_url, psycopg_url, with_database

BENCH_HOME = Path(__file__).resolve().parent.parent / ".renderqueue" / "bench"
#: `make bench-quick` sets BENCH_SCALE=0.1: every benchmark at a tenth of its size.
SCALE = float(os.environ.get("BENCH_SCALE", "1"))


#: How many times a figure whose ratio swings across its bar between runs is measured;
#: the table shows the median (and every run's value beside it). Once at another scale:
#: a scaled run enforces no bar (see `bench.__main__.exit_status`), so it only has to be quick.
REPEATS = int(os.environ.get("BENCH_REPEATS", 3 if SCALE == 1 else 1))

T = TypeVar("T")


def scaled(size: int, minimum: int = 1) -> int:
    """A benchmark's size at the run's scale (never below `minimum`)."""
    return max(minimum, round(size * SCALE))


def interleaved(runs: int, *measures: Callable[[], T]) -> list[list[T]]:
    """Run each of `measures` once per round, in turn, for `runs` rounds.

    Taking turns puts a burst of the machine's other work on both sides of a comparison
    rather than on one side's every run. Returns one list of results per measure.
    """
    results: list[list[T]] = [[] for _ in measures]
    for _ in range(runs):
        for found, measure in zip(results, measures, strict=True):
            found.append(measure())
    return results


def median(samples: list[float] | tuple[float, ...]) -> float:
    """The median of a figure's runs (one run: that run)."""
    return float(statistics.median(samples))


@dataclass(frozen=True)
class Figure:
    """One measured figure and the baseline it is compared with in the same run."""

    name: str
    value: float
    baseline_name: str
    baseline_value: float
    unit: str = "/s"
    required: float | None = None
    higher_is_better: bool = True
    max_value: float | None = None  # an absolute ceiling on `value` (e.g. peak memory)
    moonshot: float | None = None  # a ratio worth reaching, shown but not enforced
    #: every run's value when the figure was measured more than once (`value` is their median)
    samples: tuple[float, ...] = ()
    #: every run's baseline value, likewise (empty: the baseline was measured once, or is a bound)
    baseline_samples: tuple[float, ...] = ()

    @classmethod
    def of_runs(
        cls,
        name: str,
        samples: list[float],
        baseline_name: str,
        baseline: list[float] | float,
        **options: Any,
    ) -> Figure:
        """A figure measured `len(samples)` times: the medians are compared, every run shown."""
        baseline_samples = tuple(baseline) if isinstance(baseline, list) else ()
        return cls(
            name,
            median(samples),
            baseline_name,
            median(baseline_samples) if baseline_samples else float(baseline),  # type: ignore[arg-type]
            samples=tuple(samples),
            baseline_samples=baseline_samples,
            **options,
        )

    @property
    def runs(self) -> int:
        """How many runs `value` is the median of."""
        return max(1, len(self.samples))

    def value_text(self) -> str:
        return _with_runs(self.value, self.samples, self.unit)

    def baseline_text(self) -> str:
        return _with_runs(self.baseline_value, self.baseline_samples, self.unit)

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.value / self.baseline_value
        return self.baseline_value / self.value

    @property
    def ok(self) -> bool:
        if self.max_value is not None and self.value > self.max_value:
            return False
        return self.required is None or self.ratio >= self.required

    @property
    def requirement(self) -> str:
        parts = [f"≥ {self.required:.2f}x"] if self.required else []
        if self.max_value is not None:
            parts.append(f"≤ {self.max_value:,.0f} {self.unit}")
        return ", ".join(parts) or "-"

    @property
    def moonshot_text(self) -> str:
        if self.moonshot is None:
            return "-"
        return f"≥ {self.moonshot:.2f}x ({'met' if self.ratio >= self.moonshot else 'not yet'})"


def _with_runs(value: float, samples: tuple[float, ...], unit: str) -> str:
    text = f"{value:,.1f} {unit}".strip()
    if len(samples) <= 1:
        return text
    runs = ", ".join(f"{v:,.1f}" for v in samples)
    return f"{text} (median of {len(samples)}: {runs})"


@dataclass
class Notes:
    """What a benchmark measured besides its figures, in the order it was measured.

    Printed as the run goes and written under the benchmark's table in docs/BENCHMARKS.md,
    so that the file's detail (set-up times, plans, where the CPU goes) is the run's own
    output, never written by hand.
    """

    lines: list[str] = field(default_factory=list)

    def __call__(self, console: Console, text: str) -> None:
        console.print(text, markup=False, highlight=False)
        self.lines.append(text.strip("\n"))


#: the running benchmark's notes (one benchmark per process: `python -m bench` runs each
#: in its own child)
note = Notes()


def bench_server_url() -> str:
    """The `postgres` database of the server the benchmarks use (DATABASE_URL's, or embedded)."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        return with_database(psycopg_url(configured), "postgres")
    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    return embedded_url(BENCH_HOME, "postgres")


@contextmanager
def scratch_ledger(server_url: str | None = None) -> Iterator[str]:
    """A freshly migrated ledger database on the embedded server, dropped afterwards."""
    server_url = server_url or bench_server_url()
    name = f"rq_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    url = with_database(server_url, name)
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
