"""Money for people: micro-dollars (the ledger's unit, an integer) as dollars.

One module for every conversion out of micro-dollars, so a figure reads the same in the
terminal, Dagster metadata, alerts and reports. Exact throughout (integer arithmetic or
`Decimal`); a float only where a number is wanted for plots (`micros_to_usd`).
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

MICROS_PER_USD = 1_000_000
_MICRO = Decimal("0.000001")


def _split(micros: int) -> tuple[str, int, str]:
    """Sign, whole dollars and the six decimals of an amount of micro-dollars."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(int(micros)), MICROS_PER_USD)
    return sign, whole, f"{frac:06d}"


def dollars(micros: int) -> str:
    """Exact, every digit: -1_500_000 -> '-$1.500000' (ledger, reports, billing check)."""
    sign, whole, frac = _split(micros)
    return f"{sign}${whole:,}.{frac}"


def usd(micros: int | None) -> str:
    """Short, for budgets and batches: 12_500_000 -> '$12.50', 1_234_567 -> '$1.234567'.

    Trailing zeros go, down to cents; None (a budget that is not set) is 'no cap'.
    """
    if micros is None:
        return "no cap"
    sign, whole, frac = _split(micros)
    return f"${sign}{whole:,}.{frac.rstrip('0').ljust(2, '0')}"


def usd_decimal(micros: int | None) -> Decimal | None:
    """Dollars as a Decimal with six places (FOCUS exports); None stays None."""
    return None if micros is None else (Decimal(micros) * _MICRO).quantize(_MICRO)


def cents(micros: int) -> int:
    """Micro-dollars to whole cents, half up: the rule of sql/functions' rq_micros_to_cents,
    written again here so the report checks recompute the tables' cents independently."""
    return int((Decimal(int(micros)) / 10_000).quantize(Decimal(1), ROUND_HALF_UP))


def micros_to_usd(micros: int) -> float:
    """For numeric metadata only (plots, comparisons); exact figures stay in micro-dollars."""
    return float(Decimal(int(micros)) / Decimal(MICROS_PER_USD))
