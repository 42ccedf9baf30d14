"""Connections to the ledger database."""

from __future__ import annotations

import psycopg
from psycopg.rows import dict_row

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.server import database_url, psycopg_url
from renderqueue_pipeline.errors import DatabaseUnavailable


def connect(url: str | None = None, *, autocommit: bool = False) -> LedgerConnection:
    """A psycopg connection with dict rows to `url` (default: the database in use)."""
    target = psycopg_url(url or database_url())
    try:
        return LedgerConnection.connect(target, autocommit=autocommit, row_factory=dict_row)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot reach the ledger database: {exc}".strip()) from exc
