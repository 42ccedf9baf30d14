"""Which intent a batch run sends next, and when: round-robin by user, within fal's queue bound.

`FairFeed` hands the run's intents out round-robin by user; `WaitingGate` holds a send
while our requests waiting at fal for its endpoint are at `RENDERQUEUE_FAL_MAX_QUEUED`
(and each user at their fair share of it, across runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.ledger import Intent

#: Rows read ahead of the fan-out so it can take them round-robin by user (FairFeed).
FAIR_LOOKAHEAD_ROWS = 4096
#: How often (at most) the fan-out re-counts our requests waiting at fal (WaitingGate).
WAITING_POLL_S = 0.25
#: A `submitted` row older than this no longer counts as waiting at fal (a lost webhook).
WAITING_WINDOW_S = 6 * 3600.0


class FairFeed:
    """Intents waiting to be sent, handed out round-robin by user.

    A file with user A's 40 rows then user B's 6 sends A, B, A, B, ...: B's rows go out
    among the first 12, not last. The producer reads up to `lookahead` rows ahead of
    the fan-out (their intents are written and claimed, not yet admitted or sent).
    """

    def __init__(self, lookahead: int) -> None:
        self.lookahead = lookahead
        self.size = 0
        self.closed = False
        self._by_user: OrderedDict[int, deque[Intent]] = OrderedDict()
        self._changed = asyncio.Condition()

    # ASYNC109: running out of time is an answer here (False), not a cancellation
    async def put(self, intent: Intent, *, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Add an intent; False when the feed stayed full for `timeout` seconds."""
        async with self._changed:
            if self.size >= self.lookahead:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self.size < self.lookahead), timeout
                    )
                if self.size >= self.lookahead:
                    return False
            self._by_user.setdefault(intent.user_id, deque()).append(intent)
            self.size += 1
            self._changed.notify_all()
            return True

    async def close(self) -> None:
        async with self._changed:
            self.closed = True
            self._changed.notify_all()

    async def get(self) -> Intent | None:
        """The next user's next intent (None once closed and empty)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.size > 0 or self.closed)
            if self.size == 0:
                return None
            user, rows = next(iter(self._by_user.items()))
            intent = rows.popleft()
            if rows:
                self._by_user.move_to_end(user)
            else:
                del self._by_user[user]
            self.size -= 1
            self._changed.notify_all()
            return intent


class WaitingGate:
    """Holds a send while our requests waiting at fal for its endpoint are at the bound.

    "Waiting at fal" is counted from our own ledger: `submitted` generations of the
    endpoint (queued or running at fal; the running ones are at most the account's
    concurrency cap), one grouped count by user every `WAITING_POLL_S` at most, plus this
    run's sends not yet in a count (`leave` after the recording commits; a send stops being
    added once a count that started after that commit has it: counted twice for a moment,
    never missed). No call to fal and no per-row query.
    Another run's calls in flight are not seen (at most its concurrency). As the count
    covers every run, a user also waits while they hold their fair share of the bound (the
    bound over the users with requests waiting): runs in flight together take turns too.
    """

    def __init__(self, conn: LedgerConnection, bound: int) -> None:
        self.conn = conn
        self.bound = bound
        self.pauses = 0  # sends that had to wait for room
        self._counts: dict[str, dict[int, int]] = {}
        self._read_at: dict[str, float] = {}
        self._inflight: dict[tuple[str, int], int] = {}
        self._left: list[tuple[str, int, float]] = []  # recorded, maybe not yet counted
        self._left_lock = threading.Lock()  # `leave` is called from the recorder's thread
        self._lock = asyncio.Lock()

    def _read(self, endpoint: str) -> dict[int, int]:
        rows = self.conn.execute(
            q("our_requests_waiting_at_fal"),
            {"endpoint": endpoint, "window_seconds": WAITING_WINDOW_S},
        ).fetchall()
        return {r["user_id"]: r["waiting"] for r in rows}

    async def _refresh(self, endpoint: str) -> dict[int, int]:
        async with self._lock:
            if time.monotonic() - self._read_at.get(endpoint, -1e9) >= WAITING_POLL_S:
                started = time.monotonic()
                self._counts[endpoint] = await asyncio.to_thread(self._read, endpoint)
                self._read_at[endpoint] = time.monotonic()
                with self._left_lock:
                    still: list[tuple[str, int, float]] = []
                    for left in self._left:  # recorded before this count began: in it now
                        if left[0] == endpoint and left[2] < started:
                            self._inflight[(endpoint, left[1])] -= 1
                        else:
                            still.append(left)
                    self._left = still
        return self._counts[endpoint]

    def _room(self, endpoint: str, counts: dict[int, int], user_id: int) -> bool:
        mine = {u: n for (e, u), n in self._inflight.items() if e == endpoint and n}
        total = sum(counts.values()) + sum(mine.values())
        users = len(counts.keys() | mine.keys() | {user_id})
        share = max(1, self.bound // users)
        return total < self.bound and counts.get(user_id, 0) + mine.get(user_id, 0) < share

    def leave(self, endpoint: str, user_id: int) -> None:
        """The send `enter` let through is recorded (or was not made): the next count has it."""
        if self.bound > 0:
            with self._left_lock:
                self._left.append((endpoint, user_id, time.monotonic()))

    async def enter(self, endpoint: str, user_id: int, stopped: Callable[[], bool]) -> None:
        """Return when there is room to send one more request for `user_id` (bound 0: now)."""
        if self.bound <= 0:
            return
        counts = self._counts.get(endpoint)
        if counts is None or time.monotonic() - self._read_at[endpoint] >= 1.0:
            counts = await self._refresh(endpoint)
        paused = False
        while not self._room(endpoint, counts, user_id) and not stopped():
            if not paused:
                self.pauses += 1
                paused = True
            await asyncio.sleep(WAITING_POLL_S)
            counts = await self._refresh(endpoint)
        key = (endpoint, user_id)
        self._inflight[key] = self._inflight.get(key, 0) + 1
