"""Peak memory of a benchmark's own process, and a fresh process to measure it in.

Peak memory is read from VmHWM in /proc/<pid>/status, never from `ru_maxrss`: Linux
carries `ru_maxrss` across fork and exec, so a child started by a large parent (the
`make bench` process after a heavy benchmark) reports its parent's peak, not its own.
VmHWM belongs to the address space, which exec replaces, so it is the child's alone.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def peak_rss_mb(pid: int | str = "self") -> float:
    """The peak resident set size (VmHWM) of a process, in MB (MiB)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    if match is None:
        raise RuntimeError(f"no VmHWM in /proc/{pid}/status")
    return int(match.group(1)) / 1024


def _child(target: Callable[..., Any], args: tuple, results: Any) -> None:
    started = time.perf_counter()
    result = target(*args)
    elapsed = time.perf_counter() - started
    results.put((elapsed, peak_rss_mb(), result))


def measured(target: Callable[..., Any], *args: Any) -> tuple[float, float, Any]:
    """Run `target(*args)` in a fresh spawned process: (seconds, its peak RSS in MB, result).

    `spawn`, not `fork`: a forked child starts with its parent's pages mapped, so its
    peak would include whatever the parent held.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(target, args, results))
    process.start()
    while True:
        try:
            outcome = results.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive():
                name = getattr(target, "__name__", repr(target))
                raise RuntimeError(f"{name} died (exit {process.exitcode})") from None
    process.join()
    return outcome
