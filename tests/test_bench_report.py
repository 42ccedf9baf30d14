"""What `make bench` writes: medians of repeated runs, and every detail from the run itself."""

from __future__ import annotations

import dataclasses
import io
import json
from datetime import UTC, datetime

from rich.console import Console

from bench.__main__ import Section, exit_status, render_markdown
from bench.common import Figure, Notes, interleaved


def test_a_repeated_figure_compares_the_medians_not_the_best_run() -> None:
    figure = Figure.of_runs(
        "month reconciled, SQL",
        [8.1, 5.0, 9.0],
        "pandas merge",
        [74.0, 90.0, 60.0],
        unit="s",
        required=10.0,
        higher_is_better=False,
    )

    assert (figure.value, figure.baseline_value) == (8.1, 74.0)
    assert figure.runs == 3
    # the lucky pairing (5.0 s against 90.0 s: 18x) would meet the bar; the medians do not
    assert round(figure.ratio, 2) == 9.14
    assert not figure.ok


def test_a_repeated_figure_against_a_fixed_bound_takes_the_median_run() -> None:
    figure = Figure.of_runs("submits/s", [197.6, 262.9, 230.0], "bound", 320.0, required=0.7)

    assert figure.value == 230.0
    assert figure.baseline_value == 320.0
    assert figure.baseline_samples == ()
    assert figure.ok


def test_interleaved_runs_take_turns_so_load_lands_on_both_sides() -> None:
    calls: list[str] = []

    def side(name: str):
        def measure() -> float:
            calls.append(name)
            return float(len(calls))

        return measure

    ours, theirs = interleaved(3, side("ours"), side("theirs"))

    assert calls == ["ours", "theirs"] * 3
    assert (ours, theirs) == ([1.0, 3.0, 5.0], [2.0, 4.0, 6.0])


def test_the_file_says_how_many_runs_and_shows_each_and_the_runs_notes() -> None:
    figure = Figure.of_runs("submits/s", [197.6, 262.9, 230.0], "bound", 320.0, required=0.7)
    # the child hands its figures to `make bench` as JSON: the runs survive the trip
    figure = Figure(**json.loads(json.dumps(dataclasses.asdict(figure))))
    notes = Notes()
    notes(Console(file=io.StringIO()), "  fan-out: 230.0/s over 21.7 s")
    section = Section(
        name="submit",
        note="Batch submission.",
        started=datetime(2026, 12, 6, 3, 0, tzinfo=UTC),
        seconds=60.0,
        figures=[figure],
        notes=notes.lines,
    )

    text = render_markdown([section])

    assert "| 230.0 /s (median of 3: 197.6, 262.9, 230.0) |" in text
    assert "| 0.72x | ≥ 0.70x | yes |" in text
    assert "  fan-out: 230.0/s over 21.7 s" in text
    assert "measured 3 times" in text


def _section(name: str, figures: list[Figure], error: str | None = None) -> Section:
    return Section(name, "", datetime(2026, 12, 6, tzinfo=UTC), figures=figures, error=error)


def test_a_missed_bar_fails_a_full_run_but_not_a_developers_quick_run() -> None:
    missed = [_section("submit", [Figure("submits/s", 100.0, "bound", 320.0, required=0.7)])]
    held = [_section("submit", [Figure("submits/s", 300.0, "bound", 320.0, required=0.7)])]
    crashed = [_section("submit", [], error="exited with status 1")]

    assert exit_status(missed, 1.0) == 1
    assert exit_status(held, 1.0) == 0
    assert exit_status(missed, 0.1) == 0  # ratios at a tenth of the size are not the bars'
    assert exit_status(crashed, 0.1) == 1
