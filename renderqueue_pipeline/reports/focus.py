"""A month's spend in the FinOps Open Cost and Usage Specification (FOCUS) shape.

Finance tools read FOCUS: one row per charge with standard column names. Here a charge is
one completed generation of the month (the ones the report tables' cost sums), so the
`BilledCost` column sums to the month's cost in `spend_monthly_by_*` exactly:

- `BilledCost` / `EffectiveCost`: the ledger's cost, which is fal's billed figure once fal
  billed the request and our priced figure until then (`x_CostBasis` says which);
- `ListCost`: our own figure from the published price (`computed_cost_micros`), so
  `ListCost - BilledCost` is what fal's bill differs by;
- `ChargePeriodStart` / `End`: when the request reached fal and when it finished;
  `BillingPeriodStart` / `End`: the UTC month ([start, end));
- `ConsumedQuantity` / `PricingQuantity`: the seconds the generation was priced for;
- `Tags`: JSON of who asked: `{"user": "...", "batch": "..."}` (batch only when it came
  from a batch file).

Money is exact: costs are decimals with 6 places (micro-dollars), written as text in the
CSV and as Decimal128(38, 6) in the Parquet file (FOCUS's Decimal type).
"""

from __future__ import annotations

import io
import json
from datetime import UTC, date, datetime
from decimal import Decimal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.money import usd_decimal
from renderqueue_pipeline.reports.months import month_range

MICRO = Decimal("0.000001")

#: Column name -> Arrow type, in the order files carry them. `x_` columns are ours (FOCUS
#: reserves that prefix for provider-specific columns).
FOCUS_SCHEMA = pa.schema(
    [
        ("BilledCost", pa.decimal128(38, 6)),
        ("EffectiveCost", pa.decimal128(38, 6)),
        ("ListCost", pa.decimal128(38, 6)),
        ("ContractedCost", pa.decimal128(38, 6)),
        ("BillingCurrency", pa.string()),
        ("BillingPeriodStart", pa.timestamp("us", tz="UTC")),
        ("BillingPeriodEnd", pa.timestamp("us", tz="UTC")),
        ("ChargePeriodStart", pa.timestamp("us", tz="UTC")),
        ("ChargePeriodEnd", pa.timestamp("us", tz="UTC")),
        ("ChargeCategory", pa.string()),
        ("ChargeFrequency", pa.string()),
        ("ChargeDescription", pa.string()),
        ("ProviderName", pa.string()),
        ("PublisherName", pa.string()),
        ("InvoiceIssuerName", pa.string()),
        ("ServiceName", pa.string()),
        ("ServiceCategory", pa.string()),
        ("ResourceId", pa.string()),
        ("ResourceType", pa.string()),
        ("ConsumedQuantity", pa.decimal128(38, 6)),
        ("ConsumedUnit", pa.string()),
        ("PricingQuantity", pa.decimal128(38, 6)),
        ("PricingUnit", pa.string()),
        ("ListUnitPrice", pa.decimal128(38, 6)),
        ("Tags", pa.string()),
        ("x_UserId", pa.string()),
        ("x_BatchId", pa.string()),
        ("x_CostBasis", pa.string()),
        ("x_FalBilledCost", pa.decimal128(38, 6)),
    ]
)
FOCUS_COLUMNS = tuple(FOCUS_SCHEMA.names)
TIME_COLUMNS = ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd")


def _seconds(value: Decimal | None) -> Decimal | None:
    return None if value is None else Decimal(value).quantize(MICRO)


def focus_records(conn: LedgerConnection, month: date) -> list[dict]:
    """The month's FOCUS rows as dicts of Python values (Decimal money, UTC datetimes)."""
    start, end = month_range(month)
    rows = conn.execute(q("focus_rows_for_month"), {"start": start, "end": end}).fetchall()
    records = []
    for r in rows:
        seconds = _seconds(r["billed_seconds"])
        list_cost = usd_decimal(r["list_micros"])
        tags = {"user": str(r["user_id"])}
        if r["batch_id"] is not None:
            tags["batch"] = str(r["batch_id"])
        records.append(
            {
                "BilledCost": usd_decimal(r["cost_micros"]),
                "EffectiveCost": usd_decimal(r["cost_micros"]),
                "ListCost": list_cost,
                "ContractedCost": usd_decimal(r["cost_micros"]),
                "BillingCurrency": "USD",
                "BillingPeriodStart": start,
                "BillingPeriodEnd": end,
                "ChargePeriodStart": r["created_at"],
                "ChargePeriodEnd": r["finished_at"] or r["created_at"],
                "ChargeCategory": "Usage",
                "ChargeFrequency": "Usage-Based",
                "ChargeDescription": f"{r['endpoint']} generation {r['request_id']}",
                "ProviderName": "fal",
                "PublisherName": "fal",
                "InvoiceIssuerName": "fal",
                "ServiceName": "fal",
                "ServiceCategory": "AI and Machine Learning",
                "ResourceId": r["request_id"],
                "ResourceType": r["endpoint"],
                "ConsumedQuantity": seconds,
                "ConsumedUnit": "Second",
                "PricingQuantity": seconds,
                "PricingUnit": "Second",
                "ListUnitPrice": (list_cost / seconds).quantize(MICRO)
                if seconds and list_cost is not None
                else None,
                "Tags": json.dumps(tags, sort_keys=True),
                "x_UserId": str(r["user_id"]),
                "x_BatchId": None if r["batch_id"] is None else str(r["batch_id"]),
                "x_CostBasis": r["cost_basis"],
                "x_FalBilledCost": usd_decimal(r["fal_billed_micros"]),
            }
        )
    return records


def focus_parquet(records: list[dict]) -> bytes:
    """The rows as a Parquet file with FOCUS's types (Decimal money, UTC timestamps)."""
    table = pa.Table.from_pylist(records, schema=FOCUS_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def focus_csv(records: list[dict]) -> bytes:
    """The rows as CSV: money as exact decimal text, times as ISO 8601 UTC."""
    frame = pd.DataFrame.from_records(records, columns=list(FOCUS_COLUMNS))
    for column in (
        "BillingPeriodStart",
        "BillingPeriodEnd",
        "ChargePeriodStart",
        "ChargePeriodEnd",
    ):
        frame[column] = [_iso(v) for v in frame[column]]
    return frame.to_csv(index=False).encode()


def _iso(value: datetime | None) -> str | None:
    if value is None or pd.isna(value):
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
