"""What every benchmark shares: the figure type and a throw-away ledger database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from renderqueue_pipeline.db.migrate import migrate
from renderqueue_pipeline.db.server import embedded_url, psycopg_url, with_database

BENCH_HOME = Path(__file__).resolve().parent.parent / ".renderqueue" / "bench"
#: `make bench-quick` sets BENCH_SCALE=0.1: every benchmark at a tenth of its size.
SCALE = float(os.environ.get("BENCH_SCALE", "1"))


def scaled(size: int, minimum: int = 1) -> int:
    """A benchmark's size at the run's scale (never below `minimum`)."""
    return max(minimum, round(size * SCALE))


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
