"""How many fal calls a batch run keeps in flight: the adaptive limit and the gateway shards.

A 429 from fal halves the fan-out and pauses it; successes grow it back to the run's
`concurrency`. The calls are spread over several gateways of at most `CALLS_PER_GATEWAY`
each (`shard_sizes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

#: Calls in flight per gateway (each has its own HTTP connection pool): see `shard_sizes`.
CALLS_PER_GATEWAY = 8
MAX_BACKOFF_S = 30.0


class AdaptiveLimit:
    """At most `limit` calls in flight; a 429 halves it and pauses, successes regrow it.

    429s that arrive while already paused (calls that were in flight together) count as
    one: the pause doubles only for 429s after the previous pause ended with no success
    in between (0.25 s, 0.5 s, ... up to 30 s).
    """

    BASE_PAUSE_S = 0.25

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.limit = ceiling
        self.lowest = ceiling
        self.active = 0
        self.rate_limited = 0
        self._resume_at = 0.0
        self._consecutive = 0
        self._streak = 0
        self._changed = asyncio.Condition()

    async def acquire(self) -> None:
        while True:
            delay = self._resume_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            async with self._changed:
                if self.active < self.limit:
                    self.active += 1
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=1.0)

    async def release(self, *, rate_limited: bool = False) -> None:
        async with self._changed:
            self.active -= 1
            now = time.monotonic()
            if rate_limited:
                self.rate_limited += 1
                self._streak = 0
                if now >= self._resume_at:  # a new 429, not one of the same burst
                    self._consecutive += 1
                    self.limit = max(1, self.limit // 2)
                    self.lowest = min(self.lowest, self.limit)
                    pause = min(self.BASE_PAUSE_S * 2 ** (self._consecutive - 1), MAX_BACKOFF_S)
                    self._resume_at = now + pause * random.uniform(0.8, 1.2)  # noqa: S311 - jitter
            else:
                self._consecutive = 0
                self._streak += 1
                if self._streak >= self.limit and self.limit < self.ceiling:
                    self._streak = 0
                    self.limit += 1
            self._changed.notify_all()


def shard_sizes(concurrency: int) -> list[int]:
    """How many calls each gateway carries: `concurrency` split into pools of at most 8.

    fal-client's HTTP pool (httpcore) keeps at most 20 idle connections, so with more calls
    in flight it keeps closing and re-opening TLS connections, and its bookkeeping per
    request grows with the pool's size. Several small pools cost half the CPU per request
    of one large one, on our side and on the server's (measured: bench/submit.py).
    """
    shards = -(-concurrency // CALLS_PER_GATEWAY)
    return [len(range(i, concurrency, shards)) for i in range(shards)]
