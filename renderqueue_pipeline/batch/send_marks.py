"""The one admission of a batch item, just before its call: many items per statement.

Each worker awaits its item's mark; marks that arrive while a statement runs go in the
next one (`ledger.claim_for_send` decides each against its user's budget of the month it
is sent in).
"""

from __future__ import annotations

import asyncio

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.ledger import claim_for_send

Claim = tuple[bool, str | None] | None


class SendMarks:
    """Admits and marks items sent just before their calls, many per statement.

    A worker awaits `mark(item_id)`: (True, None) when admitted (send it), (False, reason)
    when over budget (rejected, do not send), None when the item was not this run's to
    send. Marks that arrive while one statement runs go in the next, so the cost is one
    round trip per burst, not per request (the admission is `ledger.claim_for_send`).
    """

    def __init__(
        self,
        conn: LedgerConnection,
        claimer: str,
        lease_seconds: float,
        default_limit: int | None,
    ) -> None:
        self.conn = conn
        self.claimer = claimer
        self.lease_seconds = lease_seconds
        self.default_limit = default_limit
        self._waiting: list[tuple[int, asyncio.Future[Claim]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def mark(self, item_id: int) -> Claim:
        future: asyncio.Future[Claim] = asyncio.get_running_loop().create_future()
        self._waiting.append((item_id, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    def _claim(self, item_ids: list[int]) -> dict[int, tuple[bool, str | None]]:
        return claim_for_send(
            self.conn,
            item_ids,
            self.claimer,
            lease_seconds=self.lease_seconds,
            default_limit_micros=self.default_limit,
        )

    async def _flush(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting, []
            try:
                claimed = await asyncio.to_thread(self._claim, [i for i, _ in group])
            except Exception as exc:  # noqa: BLE001 - every waiter of the group gets the error
                for _, future in group:
                    future.set_exception(exc)
            else:
                for item_id, future in group:
                    future.set_result(claimed.get(item_id))
