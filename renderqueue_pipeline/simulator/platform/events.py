"""One billing event as fal's billing-events API reports it, and its JSON rendering."""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
from typing import Any, NamedTuple


class BillingEvent(NamedTuple):
    """One billed request, as fal's billing-events API reports it (a tuple: cheap to make
    by the hundred thousand)."""

    request_id: str
    endpoint_id: str
    timestamp: float  # unix seconds (when the request finished)
    output_units: float
    unit_price: float  # USD per unit
    percent_discount: float | None
    cost_estimate_nano_usd: int
    visible_at: float = 0.0  # not on the wire: when the event shows up in the API
    #: the request's X-Fal-Tags as (key, value) pairs: what usage by tag groups on
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple[float, str]:
        return (self.timestamp, self.request_id)

    def as_json_text(self) -> str:
        """The same record as `as_json`, rendered directly (pages of 10,000 stay cheap)."""
        discount = "null" if self.percent_discount is None else repr(self.percent_discount)
        return (
            f'{{"request_id":{_quoted(self.request_id)},'
            f'"endpoint_id":{_quoted_name(self.endpoint_id)},'
            f'"timestamp":"{iso(self.timestamp)}","output_units":{self.output_units!r},'
            f'"unit_price":{self.unit_price!r},"percent_discount":{discount},'
            f'"cost_estimate_nano_usd":{self.cost_estimate_nano_usd}}}'
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "endpoint_id": self.endpoint_id,
            "timestamp": iso(self.timestamp),
            "output_units": self.output_units,
            "unit_price": self.unit_price,
            "percent_discount": self.percent_discount,
            "cost_estimate_nano_usd": self.cost_estimate_nano_usd,
        }


def _quoted(text: str) -> str:
    """A JSON string; the common plain case without json.dumps."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


#: endpoint ids repeat on every event: quoted once each
_quoted_name = functools.lru_cache(maxsize=1024)(_quoted)

_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


@functools.lru_cache(maxsize=4096)
def _iso_minute(minute: int) -> str:
    """'YYYY-MM-DDTHH:MM:' of a minute since the epoch (events of a page share a few)."""
    day, rest = divmod(minute, 1_440)
    hours, minutes = divmod(rest, 60)
    return f"{dt.date.fromordinal(_EPOCH_ORDINAL + day).isoformat()}T{hours:02d}:{minutes:02d}:"


def iso(wall: float) -> str:
    """RFC 3339 UTC with microseconds, e.g. 2026-10-01T00:00:05.250000Z (the same instant
    datetime.fromtimestamp gives: microseconds rounded half to even; cheap per call)."""
    frac, whole = math.modf(wall)
    micros = round(frac * 1_000_000)
    seconds = int(whole)
    if micros < 0:
        seconds, micros = seconds - 1, micros + 1_000_000
    elif micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    minute, secs = divmod(seconds, 60)
    return f"{_iso_minute(minute)}{secs:02d}.{micros:06d}Z"


def discounted_nanos(nanos: int, percent_discount: float | None) -> int:
    if not percent_discount:
        return nanos
    return round(nanos * (100.0 - percent_discount) / 100.0)
