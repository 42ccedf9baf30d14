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
