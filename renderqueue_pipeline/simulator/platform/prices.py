"""The simulator's own price list (with history, as the ledger's `prices`) and fal's
pricing API entries built from it."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

NANOS_PER_MICRO = 1_000
#: fal's pricing unit for per-second video endpoints.
SECOND = "second"


@dataclass(frozen=True)
class SimPrice:
    """One price row, keyed like the ledger's `prices` (null resolution/audio: any)."""

    endpoint: str
    resolution: str | None
    with_audio: bool | None
    micros_per_second: int
    base_micros: int = 0
    base_seconds: float = 0.0
    default_resolution: str | None = None
    effective_from: float = 0.0  # unix seconds
    unit: str = SECOND

    def cost_nanos(self, seconds: float) -> int:
        """fal's cost in nano-dollars: base + max(seconds - base_seconds, 0) x rate."""
        extra = max(seconds - self.base_seconds, 0.0) * self.micros_per_second * NANOS_PER_MICRO
        return self.base_micros * NANOS_PER_MICRO + round(extra)


_JAN_2026 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()
_SEEDANCE = ("bytedance/seedance-2.0/text-to-video", "fal-ai/seedance-2.0/text-to-video")
_SEEDANCE_RATES = {"480p": 134_505, "720p": 303_400, "1080p": 680_400}
_FAST_RATES = {"480p": 107_595, "720p": 241_900, "1080p": 544_275}
_VEO = {
    ("720p", False): 200_000,
    ("720p", True): 400_000,
    ("1080p", False): 200_000,
    ("1080p", True): 400_000,
    ("4k", False): 400_000,
    ("4k", True): 600_000,
}


def seed_prices() -> list[SimPrice]:
    """The ledger's seed prices (sql/ seed migration); a test keeps the two equal."""
    rows = [
        SimPrice(endpoint, res, None, rate, default_resolution="720p", effective_from=_JAN_2026)
        for endpoint in _SEEDANCE
        for res, rate in _SEEDANCE_RATES.items()
    ]
    rows += [
        SimPrice(
            "bytedance/seedance-2.0/fast/text-to-video",
            res,
            None,
            rate,
            default_resolution="720p",
            effective_from=_JAN_2026,
        )
        for res, rate in _FAST_RATES.items()
    ]
    rows += [
        SimPrice(
            "fal-ai/veo3.1", res, audio, rate, default_resolution="720p", effective_from=_JAN_2026
        )
        for (res, audio), rate in _VEO.items()
    ]
    rows += [
        SimPrice(
            "fal-ai/kling-video/v3/turbo/pro/text-to-video",
            None,
            None,
            140_000,
            effective_from=_JAN_2026,
        ),
        SimPrice(
            "fal-ai/kling-video/v2.5-turbo/pro/image-to-video",
            None,
            None,
            70_000,
            base_micros=350_000,
            base_seconds=5.0,
            effective_from=_JAN_2026,
        ),
    ]
    return rows


class PriceBook:
    """The simulator's own price list, with history (a change is a new row, as in the ledger)."""

    def __init__(self, rows: Iterable[SimPrice] | None = None) -> None:
        self.rows: list[SimPrice] = list(rows if rows is not None else seed_prices())

    def row_for(self, endpoint: str, inputs: dict[str, Any], at: float) -> SimPrice | None:
        """The row in force: like the ledger's rq_price_for (null columns match anything)."""
        candidates = []
        for row in self.rows:
            if row.endpoint != endpoint or row.effective_from > at:
                continue
            resolution = inputs.get("resolution") or row.default_resolution
            audio = inputs.get("generate_audio", True)
            if row.resolution is not None and row.resolution != resolution:
                continue
            if row.with_audio is not None and row.with_audio != bool(audio):
                continue
            candidates.append(row)
        if not candidates:
            return None
        return max(
            candidates,
            key=lambda r: (r.effective_from, r.resolution is not None, r.with_audio is not None),
        )

    def reference(self, endpoint: str, at: float) -> SimPrice | None:
        """The price fal's pricing API shows: default resolution, audio on."""
        return self.row_for(endpoint, {}, at)

    def endpoints(self) -> set[str]:
        return {row.endpoint for row in self.rows}

    def set_price(
        self, endpoint: str, unit_price: float, *, unit: str = SECOND, at: float | None = None
    ) -> list[SimPrice]:
        """fal changes an endpoint's price from `at`: every resolution/audio variant scales by
        the same ratio as the reference price (fal prices variants by a token formula)."""
        at = time.time() if at is None else at
        reference = self.reference(endpoint, at)
        new_rate = round(unit_price * 1_000_000)
        if reference is None:
            added = [SimPrice(endpoint, None, None, new_rate, effective_from=at, unit=unit)]
        else:
            ref_rate = reference.micros_per_second or new_rate or 1
            keys = {(r.resolution, r.with_audio) for r in self.rows if r.endpoint == endpoint}
            added = []
            for resolution, audio in sorted(keys, key=str):
                inputs: dict[str, Any] = {}
                if resolution is not None:
                    inputs["resolution"] = resolution
                if audio is not None:
                    inputs["generate_audio"] = audio
                current = self.row_for(endpoint, inputs, at)
                if current is None:
                    continue
                rate = (
                    new_rate
                    if current == reference
                    else round(current.micros_per_second * new_rate / ref_rate)
                )
                added.append(
                    replace(
                        current,
                        micros_per_second=rate,
                        base_micros=round(current.base_micros * new_rate / ref_rate),
                        effective_from=at,
                        unit=unit,
                    )
                )
        self.rows.extend(added)
        return added

    def pricing_entries(self, endpoint_ids: list[str], at: float) -> list[dict[str, Any]]:
        entries = []
        for endpoint in endpoint_ids:
            row = self.reference(endpoint, at)
            if row is not None:
                entries.append(
                    {
                        "endpoint_id": endpoint,
                        "unit_price": row.micros_per_second / 1_000_000,
                        "unit": row.unit,
                        "currency": "USD",
                    }
                )
        return entries
