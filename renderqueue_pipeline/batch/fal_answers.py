"""What fal's answer to a submit means for the row: slow down, refused, or which field.

Shared by the batch run and the single submit, so both read fal's answers the same way.
"""

from __future__ import annotations

from renderqueue_pipeline.fal_gateway import (
    FalRequestError,
    FalSubmitOutcomeUnknown,
    FalUnavailable,
)


def is_rate_limited(exc: BaseException) -> bool:
    """fal said 429 (after fal-client's own retries): nothing was enqueued, slow down."""
    if not isinstance(exc, FalUnavailable) or isinstance(exc, FalSubmitOutcomeUnknown):
        return False
    cause = exc.__cause__
    return getattr(cause, "status_code", None) == 429 or "HTTP 429" in str(exc)


def is_definite_rejection(exc: BaseException) -> bool:
    """A 4xx other than 429: fal refused the request, nothing was enqueued or billed."""
    return isinstance(exc, FalRequestError)


def fal_field(exc: BaseException) -> str:
    """The input fal's 422 names (`loc: ["body", "duration"]`), else 'fal'."""
    detail = getattr(exc, "detail", None)
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        loc = detail[0].get("loc") or []
        if loc:
            return str(loc[-1])
    return "fal"


def fal_reason(exc: BaseException) -> str:
    """fal's own words when it gave any ("duration: Input should be ..."), else the error."""
    detail = getattr(exc, "detail", None)
    code = getattr(exc, "status_code", None)
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        parts = []
        for item in detail[:3]:
            loc = ".".join(str(p) for p in (item.get("loc") or [])[1:]) or "input"
            parts.append(f"{loc}: {item.get('msg', item)}")
        return f"fal refused it (HTTP {code}): " + "; ".join(parts)
    return str(exc)
