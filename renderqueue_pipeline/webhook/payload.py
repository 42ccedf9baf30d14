"""Webhook bodies Postgres can hold: what jsonb cannot store is escaped, never dropped.

jsonb (and text) cannot hold U+0000, and JSON can spell lone UTF-16 surrogates
(`"\\ud800"`) that are not characters at all. fal may send either inside an output it
could serialise. Refusing such a delivery would lose a completion fal billed for, so the
receiver replaces each such character, in keys and in values, with U+FFFD (the Unicode
replacement character) before storing: the event is stored and applied, and the stored
payload says where a character was replaced. The signature is checked on the raw bytes
first, so the replacement never weakens verification.
"""

from __future__ import annotations

import re
from typing import Any

REPLACEMENT = "\ufffd"

# the JSON spellings that decode to what jsonb refuses (a cheap test on the raw bytes)
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
_UNSTORABLE_CHAR = re.compile("[\x00\ud800-\udfff]")


def needs_escaping(body: bytes) -> bool:
    """True when the raw body may decode to characters jsonb refuses."""
    return _UNSTORABLE_ESCAPE.search(body) is not None


def jsonb_safe(value: Any) -> Any:
    """`value` with every U+0000 and lone surrogate in its strings replaced by U+FFFD."""
    if isinstance(value, str):
        return _UNSTORABLE_CHAR.sub(REPLACEMENT, value)
    if isinstance(value, list):
        return [jsonb_safe(item) for item in value]
    if isinstance(value, dict):
        return {jsonb_safe(key): jsonb_safe(item) for key, item in value.items()}
    return value
