"""The simulator's timing and fault model: every knob in one validated object.

The same object is filled from CLI flags, from `running_simulator(**options)` and
from the control API (`PATCH /_sim/config`), so the three cannot drift apart.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


@dataclass(frozen=True)
class Dist:
    """A duration distribution in seconds: `A` (fixed), `A:B` (uniform) or `exp:MEAN`.

    Kept as a tiny string grammar so the same spelling works on the command line,
    in Python and in JSON.
    """

    kind: Literal["fixed", "uniform", "exp"]
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, value: Any) -> Dist:
        if isinstance(value, Dist):
            return value
        if isinstance(value, int | float):
            return cls._checked("fixed", float(value), float(value))
        if isinstance(value, list | tuple) and len(value) == 2:
            return cls._checked("uniform", float(value[0]), float(value[1]))
        if not isinstance(value, str):
            raise ValueError(f"expected seconds as 'A', 'A:B' or 'exp:MEAN', got {value!r}")
        text = value.strip()
        try:
            if text.startswith("exp:"):
                return cls._checked("exp", float(text[4:]), 0.0)
            if ":" in text:
                low, high = text.split(":", 1)
                return cls._checked("uniform", float(low), float(high))
            return cls._checked("fixed", float(text), float(text))
        except ValueError as exc:
            raise ValueError(
                f"expected seconds as 'A', 'A:B' or 'exp:MEAN', got {value!r} ({exc})"
            ) from None

    @classmethod
    def _checked(cls, kind: Literal["fixed", "uniform", "exp"], a: float, b: float) -> Dist:
        if not (math.isfinite(a) and math.isfinite(b)) or a < 0 or b < 0:
            raise ValueError("seconds must be finite and >= 0")
        if kind == "uniform" and b < a:
            raise ValueError("in 'A:B' B must be >= A")
        return cls(kind, a, b)

    def sample(self, rng: random.Random) -> float:
        """Draw one value; always consumes exactly one random number (keeps seeds stable)."""
        u = rng.random()
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return self.a + (self.b - self.a) * u
        return -self.a * math.log(1.0 - u) if self.a > 0 else 0.0

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.a:g}"
        if self.kind == "uniform":
            return f"{self.a:g}:{self.b:g}"
        return f"exp:{self.a:g}"


_RATE = Field(default=0.0, ge=0.0, le=1.0)


class SimConfig(BaseModel):
    """Every simulator knob. Rates are probabilities per request (or per API call).

    Defaults follow fal's documented behaviour; docs/simulator.md lists every knob whose
    non-default value departs from it ("where the simulator differs from fal").
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = 0
    # timing (defaults: a request finishes within a few seconds so the demo feels alive)
    queue_delay: str = "0.2:1.0"
    run_time: str = "1.0:3.0"
    submit_latency: str = "0"
    status_latency: str = "0"
    # request outcomes
    failure_rate: float = _RATE
    payload_error_rate: float = _RATE
    validation: Literal["endpoint", "submit", "run"] = "endpoint"
    output_extras: bool = False
    cancel_stop_rate: float = _RATE
    requeue_rate: float = _RATE
    requeue_limit: int = Field(default=3, ge=0, le=20)
    # fal's account concurrency cap: at most this many requests run at once, the rest
    # wait in the queue (normal priority first, then low; FIFO inside each). None: no cap
    concurrency_limit: int | None = Field(default=None, ge=1)
    # webhook delivery
    webhook_duplicate_rate: float = _RATE
    webhook_duplicate_delay: str = "0.05:0.5"
    webhook_drop_rate: float = _RATE
    webhook_out_of_order_rate: float = _RATE
    webhook_out_of_order_delay: str = "0.5:2.0"
    webhook_early_rate: float = _RATE
    webhook_delay: str = "0"
    webhook_max_attempts: int = Field(default=11, ge=1, le=100)
    webhook_retry_base: float = Field(default=7.0, ge=0.0)
    webhook_retry_max: float = Field(default=3600.0, ge=0.0)
    webhook_retry_on: Literal["5xx", "4xx+5xx"] = "5xx"
    webhook_keep_timestamp: bool = False
    webhook_timeout: float = Field(default=15.0, gt=0.0)
    webhook_clock_skew: float = 0.0
    webhook_user_id: str = "sim-user"
    # API faults (per API call, before any work is done, except 500 on submit)
    api_429_rate: float = _RATE
    api_503_rate: float = _RATE
    api_500_rate: float = _RATE
    api_502_rate: float = _RATE
    api_504_rate: float = _RATE
    # fal out of reach: every queue API call loses its connection before an answer
    api_unreachable: bool = False
    # every cancel (PUT .../cancel) fails this way, whatever the rates above say
    cancel_fault: Literal["none", "unreachable", "500", "503"] = "none"
    # a submit fal enqueues whose answer is then lost (the edge answers 504): fal-client
    # retries it, so one submit becomes two requests at fal (drawn per request)
    submit_lost_answer_rate: float = _RATE
    # CDN and results
    cdn_mode: Literal["public", "signed"] = "public"
    cdn_default_lifetime: float | None = Field(default=7 * 86400.0, gt=0.0)
    cdn_url_ttl: float = Field(default=3600.0, gt=0.0)
    result_ttl: float = Field(default=3600.0, gt=0.0)
    payload_ttl: float = Field(default=30 * 86400.0, gt=0.0)
    size_scale: float = Field(default=1.0, gt=0.0)
    # auth
    fal_key: str | None = None
    admin_key: str | None = None

    @field_validator("cdn_default_lifetime", "concurrency_limit", mode="before")
    @classmethod
    def _lifetime(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
            return None
        return value

    @field_validator(
        "queue_delay",
        "run_time",
        "submit_latency",
        "status_latency",
        "webhook_duplicate_delay",
        "webhook_out_of_order_delay",
        "webhook_delay",
        mode="before",
    )
    @classmethod
    def _dist(cls, value: Any) -> str:
        return str(Dist.parse(value))

    def dist(self, name: str) -> Dist:
        """The parsed distribution of a timing knob."""
        return Dist.parse(getattr(self, name))

    def public(self) -> dict[str, Any]:
        """The config as JSON, with the required key masked (it is a secret)."""
        data = self.model_dump()
        for secret in ("fal_key", "admin_key"):
            if data.get(secret):
                data[secret] = "***"
        return data


#: Knobs a test typically scales down so a request ends in milliseconds.
FAST_TEST_OPTIONS: dict[str, Any] = {
    "queue_delay": "0.02:0.05",
    "run_time": "0.05:0.1",
    "webhook_retry_base": 0.02,
    "webhook_retry_max": 0.2,
    "webhook_timeout": 2.0,
    "webhook_duplicate_delay": "0.01:0.05",
    "webhook_out_of_order_delay": "0.2:0.6",
}
