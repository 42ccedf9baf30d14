"""Keeping the `prices` table current from fal's pricing API.

fal's pricing API gives one unit price per endpoint; the ledger prices each endpoint per
resolution and audio. The API's figure is compared with the ledger's reference row (the
endpoint's default resolution, audio on: what rq_price_for picks for a request that names
neither). When it differs, every price key of the endpoint gets a new row effective from
the moment the change was seen: the reference key at fal's price, the others scaled by the
same ratio (fal derives its resolution variants from one token price). Rows are only ever
added; history is never edited, so generations made before keep the price they were made at.

A unit the ledger cannot represent (anything but seconds of video) adds no row and is
reported, for the `fal_price_units_are_representable` check.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.queries import q
from renderqueue_pipeline.fal_platform import FalPlatform, FalPrice

#: Units the ledger's per-second price rows can represent.
SECOND_UNITS = frozenset({"second", "seconds", "s", "sec", "video_second", "video_seconds"})
SOURCE = "fal Platform API GET /v1/models/pricing"


@dataclass
class PriceSync:
    """What one look at fal's prices found and wrote."""

    seen_at: dt.datetime
    checked: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    added_rows: list[dict[str, Any]] = field(default_factory=list)
    unrepresentable: list[dict[str, Any]] = field(default_factory=list)
    not_priced_by_fal: list[str] = field(default_factory=list)

    @property
    def changed(self) -> list[str]:
        return sorted({row["endpoint"] for row in self.added_rows})


def price_version(seen_at: dt.datetime) -> str:
    return f"fal-api-{seen_at.astimezone(dt.UTC):%Y-%m-%d}"


def scaled(micros: int, new_rate: int, reference_rate: int) -> int:
    """A variant's price after the reference moved from reference_rate to new_rate."""
    return round(micros * new_rate / reference_rate) if reference_rate else new_rate


def sync_prices(
    conn: LedgerConnection,
    platform: FalPlatform,
    *,
    now: dt.datetime | None = None,
    endpoints: list[str] | None = None,
) -> PriceSync:
    """Read fal's prices for the endpoints in use; add a price row for each change."""
    now = now or dt.datetime.now(dt.UTC)
    if endpoints is None:
        with conn.transaction():
            rows = conn.execute(
                q("spend_endpoints_in_use"), {"since": now - dt.timedelta(days=31)}
            ).fetchall()
        endpoints = sorted(row["endpoint"] for row in rows)
    result = PriceSync(seen_at=now, checked=list(endpoints))
    fal_prices = {p.endpoint_id: p for p in platform.pricing(endpoints)}
    with conn.transaction():
        for endpoint in endpoints:
            price = fal_prices.get(endpoint)
            if price is None:
                result.not_priced_by_fal.append(endpoint)
            elif price.unit.lower() not in SECOND_UNITS or price.currency.upper() != "USD":
                result.unrepresentable.append(
                    {
                        "endpoint": endpoint,
                        "unit": price.unit,
                        "unit_price": price.unit_price,
                        "currency": price.currency,
                    }
                )
            else:
                added = _apply(conn, endpoint, price, now)
                if added:
                    result.added_rows += added
                else:
                    result.unchanged.append(endpoint)
    return result


def _apply(
    conn: LedgerConnection, endpoint: str, price: FalPrice, now: dt.datetime
) -> list[dict[str, Any]]:
    new_rate = round(price.unit_price * 1_000_000)
    reference = conn.execute(
        q("spend_reference_price"), {"endpoint": endpoint, "at": now}
    ).fetchone()
    if reference is not None and reference["micros_per_second"] == new_rate:
        return []
    current = conn.execute(q("spend_current_price_rows"), {"endpoint": endpoint, "at": now})
    rows = current.fetchall()
    added: list[dict[str, Any]] = []
    described = f"{SOURCE}: {price.unit_price:g} {price.currency}/{price.unit}"
    if not rows:
        rows = [
            {
                "resolution": None,
                "with_audio": None,
                "micros_per_second": new_rate,
                "base_micros": 0,
                "base_seconds": 0,
                "default_seconds": 5,
                "default_resolution": None,
                "id": None,
            }
        ]
    reference_id = reference["id"] if reference is not None else None
    reference_rate = reference["micros_per_second"] if reference is not None else new_rate
    for row in rows:
        is_reference = row["id"] == reference_id or reference_id is None
        values = {
            "endpoint": endpoint,
            "resolution": row["resolution"],
            "with_audio": row["with_audio"],
            "micros_per_second": new_rate
            if is_reference
            else scaled(row["micros_per_second"], new_rate, reference_rate),
            "base_micros": scaled(row["base_micros"], new_rate, reference_rate),
            "base_seconds": row["base_seconds"],
            "default_seconds": row["default_seconds"],
            "default_resolution": row["default_resolution"],
            "effective_from": now,
            "price_version": price_version(now),
            "source": described if is_reference else f"{described}, scaled to this variant",
        }
        if conn.execute(q("spend_insert_price"), values).fetchone() is not None:
            added.append(values)
    return added
