"""One place that removes every configured secret from text before it leaves the process.

Exception texts can carry a secret (httpx's `Illegal header value b'Key sk-...'`, a
driver's error quoting a connection URL). Every exit calls `redact`: the CLI's error
printing, the reasons stored in the ledger, Dagster metadata and failures, and the
`RedactingFilter` on our loggers. The secrets are read from the environment each time
(raw and stripped), so a key that settings refused is redacted too.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from urllib.parse import unquote, urlparse

#: Variables whose whole value is a secret.
SECRET_ENVS = (
    "FAL_KEY",
    "FAL_ADMIN_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "RENDERQUEUE_DB_PASSWORD",  # `renderqueue db grant`'s new login
    "DAGSTER_PG_PASSWORD",  # Dagster's own storage login (deploy/dagster.yaml)
    "RENDERQUEUE_ALERT_WEBHOOK_URL",  # its token is in the path
)
#: Variables holding URLs whose password is a secret.
URL_ENVS = ("DATABASE_URL", "RENDERQUEUE_STORAGE_URL", "RENDERQUEUE_PROMPTS_URL")
#: Shorter values are not redacted (they would blank ordinary words, e.g. a test's "x").
MIN_SECRET_CHARS = 6
MASK = "***"


def _url_password(url: str) -> str | None:
    try:
        return urlparse(url.strip()).password
    except ValueError:
        return None


def configured_secrets() -> tuple[str, ...]:
    """Every secret value in the environment, longest first (raw, stripped, and parts).

    A fal key `id:secret` also yields its secret half; a URL's password also yields its
    percent-decoded form. Cached per set of values (a log filter calls this per record).
    """
    return _secrets(tuple(os.environ.get(name) or "" for name in SECRET_ENVS + URL_ENVS))


@lru_cache(maxsize=8)
def _secrets(values: tuple[str, ...]) -> tuple[str, ...]:
    found: set[str] = set()
    plain, urls = values[: len(SECRET_ENVS)], values[len(SECRET_ENVS) :]
    for value in plain:
        if not value:
            continue
        for candidate in (value, value.strip()):
            found.add(candidate)
            _, sep, tail = candidate.partition(":")
            if sep:
                found.add(tail)
    for url in urls:
        password = _url_password(url)
        if password:
            found.update((password, unquote(password)))
    kept = (s for s in found if len(s.strip()) >= MIN_SECRET_CHARS)
    return tuple(sorted(kept, key=len, reverse=True))


def redact(text: object) -> str:
    """`text` as a string with every configured secret replaced by `***`."""
    result = str(text)
    for secret in configured_secrets():
        if secret in result:
            result = result.replace(secret, MASK)
    return result


def redact_error(exc: BaseException) -> str:
    """`Type: message` of an exception, redacted (for reasons stored or shown)."""
    return redact(f"{type(exc).__name__}: {exc}")


class RedactingFilter(logging.Filter):
    """Redacts a record's message (and its exception text) in place; never drops it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact(formatted)
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_FILTER = RedactingFilter()
#: A logger's filters do not apply to its children's records: every logger we use is named.
OUR_LOGGERS = (
    "renderqueue",
    "renderqueue.fal",
    "renderqueue.fal.platform",
    "renderqueue.archive",
    "renderqueue.webhook",
    "renderqueue.simulator",
    "renderqueue.simulator.platform",
    "renderqueue_pipeline.db.server",
    "renderqueue_pipeline.webhook.committer",
)


def install_log_redaction(*names: str) -> None:
    """Put the filter on our loggers and on every handler of the root logger (idempotent)."""
    for name in names or OUR_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
