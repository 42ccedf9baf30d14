"""The benchmarks' peak-memory figure is the measured process's own, whatever its parent holds."""

from __future__ import annotations

from bench.memory import measured, peak_rss_mb

MB = 1024 * 1024


def _allocate(megabytes: int) -> int:
    """Hold `megabytes` of written (hence resident) memory, then let it go."""
    block = b"\x01" * (megabytes * MB)
    return len(block)


def test_a_child_reports_its_own_peak_not_its_parents() -> None:
    parent_block = b"\x02" * (300 * MB)  # the parent is large, as `make bench` gets
    assert peak_rss_mb() >= 300

    _, child_peak, allocated = measured(_allocate, 50)

    assert allocated == 50 * MB
    # the child's interpreter is ~15-40 MB; its 50 MB block on top of that, never the 300
    assert 50 <= child_peak < 50 + 100, child_peak
    del parent_block


def test_a_child_that_allocates_nothing_reports_only_its_interpreter() -> None:
    _, idle_peak, _ = measured(_allocate, 0)
    _, busy_peak, _ = measured(_allocate, 80)
    assert idle_peak < 100
    assert busy_peak - idle_peak >= 70, (idle_peak, busy_peak)
