"""The data layer: the database in use, migrations, and every query the code runs."""

from __future__ import annotations

from typing import TypeAlias

import psycopg
from psycopg.rows import DictRow, Row

#: A connection to the ledger as `db.connect()` makes it (`row_factory=dict_row`): rows are
#: dicts keyed by column name. Signatures say this, not a bare `psycopg.Connection` (whose
#: rows are tuples to a type checker).
LedgerConnection: TypeAlias = psycopg.Connection[DictRow]


class NoRowError(LookupError):
    """A query that always returns a row returned none: a fault in the SQL, not in the data."""


def one_row(cursor: psycopg.Cursor[Row]) -> Row:
    """The one row of a query that always returns one (an aggregate, `rq_now()`, an upsert's
    `returning`): `fetchone()` is typed `row | None`, and a missing row is better named here
    than met later as "None is not subscriptable"."""
    row = cursor.fetchone()
    if row is None:
        raise NoRowError(f"the query returned no row ({cursor.statusmessage or 'no status'})")
    return row
