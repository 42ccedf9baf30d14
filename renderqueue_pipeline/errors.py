"""The exceptions renderqueue raises on purpose; each message says what, where and why."""


class RenderqueueError(Exception):
    """Base for errors the CLI reports as one line."""


class LedgerInputError(RenderqueueError, ValueError):
    """Bad input to the ledger: names the field (and row, when there is one) and the reason."""

    def __init__(self, field: str, reason: str, *, row: str | int | None = None) -> None:
        self.field = field
        self.reason = reason
        self.row = row
        where = f"row {row}: " if row is not None else ""
        super().__init__(f"{where}{field}: {reason}")


class DatabaseUnavailable(RenderqueueError):
    """Postgres could not be reached or started."""


class BudgetExceeded(RenderqueueError):
    """The request would take the user past their monthly budget; nothing was sent."""

    def __init__(self, user_id: int, reason: str) -> None:
        self.user_id = user_id
        super().__init__(reason)


class SubmissionInProgress(RenderqueueError):
    """Another caller holds this idempotency key's item and has no outcome yet.

    Nothing was sent by this caller: the key reaches fal at most once. Retry later for the
    request id; an item whose sender stopped is settled by the reconciler, never resent.
    """

    def __init__(self, item_id: int, reason: str) -> None:
        self.item_id = item_id
        super().__init__(f"idempotency_key: item {item_id} {reason}")
