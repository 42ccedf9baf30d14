"""Billing events made on demand from a formula (benchmarks: no memory per event)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

from renderqueue_pipeline.simulator.platform.events import BillingEvent
from renderqueue_pipeline.simulator.platform.prices import NANOS_PER_MICRO


@dataclass(frozen=True)
class SyntheticBilling:
    """`count` billing events generated on demand (benchmarks: no memory per event).

    Event i: request id `f"{prefix}{i * stride:0{width}d}"`, timestamp evenly spread over
    [start, end), endpoint `endpoints[i % n]`, `4 + i % 12` seconds at `micros[i % n]` per
    second. Generations made with the same formula match it to the micro-dollar.
    """

    count: int
    start: float
    end: float
    prefix: str = "bench-"
    stride: int = 1
    width: int = 9
    endpoints: tuple[str, ...] = ("bytedance/seedance-2.0/text-to-video",)
    micros: tuple[int, ...] = (303_400,)

    @functools.cached_property
    def step(self) -> float:
        return (self.end - self.start) / self.count

    def event(self, i: int) -> BillingEvent:
        n = len(self.endpoints)
        seconds = 4 + i % 12
        rate = self.micros[i % n]
        return BillingEvent(
            self.prefix + str(i * self.stride).zfill(self.width),
            self.endpoints[i % n],
            self.start + i * self.step,
            float(seconds),
            rate / 1_000_000,
            None,
            seconds * rate * NANOS_PER_MICRO,
        )

    def iter_after(self, key: tuple[float, str] | None, start: float) -> Iterator[BillingEvent]:
        """Events in key order, strictly after `key` and not before `start`."""
        lo = start if key is None else max(start, key[0])
        first = max(0, math.floor((lo - self.start) / self.step) - 1) if self.step > 0 else 0
        for i in range(first, self.count):
            event = self.event(i)
            if event.timestamp < start or (key is not None and event.key <= key):
                continue
            yield event
