"""One prompt row -> a request to submit, or a rejection naming its field and reason.

Only the shape of a row is checked here (no database): the prompt, the user id, the
endpoint, and the model inputs' types. Prices, known endpoints and durations are the
ledger's rules (`validate_request`), checked when the intent is recorded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from renderqueue_pipeline.batch.source import RowDecodeError

MAX_PROMPT_CHARS = 10_000
_BIGINT_MAX = 2**63 - 1
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}
#: Columns that are not model inputs.
ROUTING_COLUMNS = ("user_id", "endpoint")


@dataclass(frozen=True)
class PromptRow:
    """A row that may be submitted: who, where, and the model inputs (prompt included)."""

    line_no: int
    user_id: int
    endpoint: str
    inputs: dict[str, Any]


@dataclass(frozen=True)
class Rejection:
    """Why a row is not submitted. `kind`: invalid | over_budget | fal."""

    line_no: int
    field: str
    reason: str
    kind: str = "invalid"
    user_id: int | None = None
    endpoint: str | None = None
    # dataclasses.field: the class's own `field` attribute shadows the name here
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    stored: bool = False  # already recorded on its batch item


@dataclass(frozen=True)
class RowDefaults:
    """What a row without its own `user_id` / `endpoint` / inputs gets."""

    user_id: int | None = None
    endpoint: str | None = None
    inputs: Mapping[str, Any] = field(default_factory=dict)


def _blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _bad_text(value: str) -> str | None:
    """Why a string cannot be stored as JSON text in Postgres, or None."""
    if "\x00" in value:
        return "contains a NUL character"
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        return "is not valid UTF-8 text"
    return None


def parse_user_id(value: Any) -> int:
    """An integer user id from a cell (7, "7", 7.0); ValueError with the reason otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+").isdigit():
        number = int(value.strip())
    else:
        raise ValueError(f"expected an integer, got {value!r}")
    if not 0 <= number <= _BIGINT_MAX:
        raise ValueError(f"must be between 0 and 2^63-1, got {number}")
    return number


def _input_value(name: str, value: Any) -> Any:
    """A model input as the model wants it: CSV cells are text, JSON keeps its types.

    `duration` is a string enum at fal ("5", "auto", "8s"), so a number becomes its
    text; `generate_audio` a boolean; `seed` an integer.
    """
    if name == "duration":
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return value.strip() if isinstance(value, str) else value
    if name == "generate_audio" and isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        return value
    if name == "seed":
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value.strip())
        if isinstance(value, float) and value.is_integer():
            return int(value)
    return value


def validate_row(
    line_no: int, raw: Mapping[str, Any], defaults: RowDefaults
) -> PromptRow | Rejection:
    """Check one row's shape and build its request; never raises for bad data."""
    decode_error = raw.get("__error__")
    if isinstance(decode_error, RowDecodeError):
        return Rejection(line_no, decode_error.field, decode_error.reason)
    for name, value in raw.items():
        if isinstance(value, str) and (problem := _bad_text(value)):
            return Rejection(line_no, name, problem)

    prompt = _row_prompt(raw.get("prompt"))
    if isinstance(prompt, _Problem):
        return Rejection(line_no, "prompt", prompt.reason)

    user_id = _row_user_id(raw.get("user_id"), defaults)
    if isinstance(user_id, _Problem):
        return Rejection(line_no, "user_id", user_id.reason)

    endpoint = _row_endpoint(raw.get("endpoint"), defaults)
    if isinstance(endpoint, _Problem):
        return Rejection(line_no, "endpoint", endpoint.reason, user_id=endpoint.with_user(user_id))

    inputs: dict[str, Any] = {k: v for k, v in defaults.inputs.items() if not _blank(v)}
    for name, value in raw.items():
        if name in ROUTING_COLUMNS or _blank(value):
            continue
        inputs[name] = _input_value(name, value)
    inputs["prompt"] = prompt
    for name in ("seed",):
        value = inputs.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            return Rejection(line_no, name, f"expected an integer, got {value!r}", user_id=user_id)
    return PromptRow(line_no, user_id, endpoint, inputs)


@dataclass(frozen=True)
class _Problem:
    """Why a cell cannot be used; `keeps_user`: the rejection still names the row's user."""

    reason: str
    keeps_user: bool = False

    def with_user(self, user_id: int) -> int | None:
        return user_id if self.keeps_user else None


def _row_prompt(cell: Any) -> str | _Problem:
    """The row's prompt, or why it cannot be sent."""
    if _blank(cell):
        return _Problem("missing or empty")
    if not isinstance(cell, str):
        return _Problem(f"expected text, got {type(cell).__name__}")
    if len(cell) > MAX_PROMPT_CHARS:
        return _Problem(f"{len(cell):,} characters; at most {MAX_PROMPT_CHARS:,} allowed")
    return cell


def _row_user_id(cell: Any, defaults: RowDefaults) -> int | _Problem:
    """The row's user id (its cell, else the default), or why there is none."""
    if _blank(cell):
        if defaults.user_id is None:
            return _Problem("missing, and no default user was given")
        return defaults.user_id
    try:
        return parse_user_id(cell)
    except ValueError as exc:
        return _Problem(str(exc))


def _row_endpoint(cell: Any, defaults: RowDefaults) -> str | _Problem:
    """The row's endpoint (its cell, else the default), or why there is none."""
    if _blank(cell):
        if not defaults.endpoint:
            return _Problem("missing, and no default endpoint was given", keeps_user=True)
        return defaults.endpoint
    if isinstance(cell, str):
        return cell.strip()
    return _Problem(f"expected text, got {cell!r}")
