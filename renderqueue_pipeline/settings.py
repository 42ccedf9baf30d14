"""All configuration, read from the environment in one place.

Every knob is an environment variable; a wrong value becomes one clear line
(`ConfigError`) naming the variable and what was expected, never a traceback.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse, urlunparse

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from renderqueue_pipeline.fal_defaults import (
    FAL_API_URL,
    FAL_JWKS_URL,
    FAL_OBJECT_LIFETIME,
    FAL_REST_URL,
)


def parse_start_timeouts(value: str) -> dict[str, float]:
    """`endpoint=seconds,endpoint=seconds` -> {endpoint: seconds}; ValueError when malformed."""
    result: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        endpoint, sep, seconds = item.rpartition("=")
        try:
            number = float(seconds)
        except ValueError:
            number = 0.0
        if not sep or not endpoint.strip() or not number > 1:  # fal-client's own floor
            raise ValueError(
                f"expected endpoint=seconds (seconds > 1) separated by commas, at {item!r}"
            )
        result[endpoint.strip()] = number
    return result


CONTROL_CHARACTER_MESSAGE = "contains a control character (a newline or tab inside the value)"
#: Settings whose value is never shown, not even in an error about it.
SECRET_FIELDS = frozenset({"fal_key", "fal_admin_key"})


def parse_alert_percents(value: str) -> tuple[int, ...]:
    """`50,80,100` -> (50, 80, 100): whole percents of a budget, 1..1000, at most 10."""
    parts = [part.strip().removesuffix("%") for part in value.split(",") if part.strip()]
    if not parts:
        raise ValueError("expected whole percents separated by commas, like 50,80,100")
    percents: set[int] = set()
    for part in parts:
        if not part.isdigit() or not 1 <= int(part) <= 1000:
            raise ValueError(f"expected whole percents from 1 to 1000, at {part!r}")
        percents.add(int(part))
    if len(percents) > 10:
        raise ValueError("at most 10 thresholds")
    return tuple(sorted(percents))


class ConfigError(Exception):
    """A setting has a value we cannot use; the message names the variable."""


class Settings(BaseSettings):
    """renderqueue's settings; each field maps to the environment variable in its alias."""

    # aliases only: with populate_by_name the field `home` would read $HOME
    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    home: Path = Field(default=Path(".renderqueue"), alias="RENDERQUEUE_HOME")
    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    fal_key: SecretStr | None = Field(default=None, alias="FAL_KEY")
    fal_jwks_url: str = Field(default=FAL_JWKS_URL, alias="FAL_JWKS_URL")
    webhook_url: str | None = Field(default=None, alias="RENDERQUEUE_WEBHOOK_URL")
    webhook_flushers: int = Field(default=1, ge=1, le=32, alias="RENDERQUEUE_WEBHOOK_FLUSHERS")
    storage_url: str | None = Field(default=None, alias="RENDERQUEUE_STORAGE_URL")
    prompts_url: str | None = Field(default=None, alias="RENDERQUEUE_PROMPTS_URL")
    # URL prefixes (folders), comma-separated, a prompts file may come from besides the
    # inbox (docs/batch.md "Where prompt files may come from")
    prompt_sources: str = Field(default="", alias="RENDERQUEUE_PROMPT_SOURCES")
    # -- fal gateway (issue 9) --
    fal_admin_key: SecretStr | None = Field(default=None, alias="FAL_ADMIN_KEY")
    fal_rest_url: str = Field(default=FAL_REST_URL, alias="RENDERQUEUE_FAL_REST_URL")
    fal_object_lifetime: float | None = Field(
        default=FAL_OBJECT_LIFETIME, alias="RENDERQUEUE_FAL_OBJECT_LIFETIME"
    )
    fal_start_timeouts_spec: str = Field(default="", alias="RENDERQUEUE_FAL_START_TIMEOUTS")
    # the fan-out pauses while this many of our requests wait at fal for one endpoint
    # (0: no bound, e.g. a throughput bench with no webhook receiver)
    fal_max_queued: int = Field(default=200, ge=0, alias="RENDERQUEUE_FAL_MAX_QUEUED")
    # fal-client's queue host:port (the simulator's, in development); fal-client reads it
    # itself, the archive lets its media through (archive.simulator_media_host)
    fal_queue_run_host: str = Field(default="", alias="FAL_QUEUE_RUN_HOST")
    # --- webhook receiver (renderqueue_pipeline/webhook/, docs/webhook.md) ---
    webhook_user_ids: str | None = Field(default=None, alias="FAL_WEBHOOK_USER_IDS")

    # --- batch submission (renderqueue_pipeline/batch/, docs/batch.md) ---
    default_monthly_budget_usd: Decimal | None = Field(
        default=None, ge=0, allow_inf_nan=False, alias="RENDERQUEUE_DEFAULT_MONTHLY_BUDGET_USD"
    )
    # a sender's claim on its items; refreshed every quarter of it while the sender lives
    submit_lease_seconds: float = Field(
        default=120, gt=0, le=86_400, alias="RENDERQUEUE_SUBMIT_LEASE_SECONDS"
    )
    # how long a second caller of an idempotency key waits for the first caller's outcome
    submit_wait_seconds: float = Field(
        default=5, ge=0, le=600, alias="RENDERQUEUE_SUBMIT_WAIT_SECONDS"
    )
    # --- alerts (renderqueue_pipeline/alerts/, docs/alerts.md) ---
    # a secret: Slack's incoming-webhook URLs carry their token in the path
    alert_webhook_url: SecretStr | None = Field(default=None, alias="RENDERQUEUE_ALERT_WEBHOOK_URL")
    budget_alert_percents_spec: str = Field(
        default="50,80,100", alias="RENDERQUEUE_BUDGET_ALERT_PERCENTS"
    )

    # -- Dagster instance and reconciler (renderqueue_pipeline/dagster_home.py, reconcile/)
    dagster_max_concurrent_runs: int = Field(
        default=8, ge=1, le=1000, alias="RENDERQUEUE_DAGSTER_MAX_RUNS"
    )
    #: Dagster's own storage: a database of this name on the ledger's server
    dagster_database: str = Field(
        default="dagster",
        min_length=1,
        max_length=63,
        pattern=r"^[a-z_][a-z0-9_]*$",
        alias="RENDERQUEUE_DAGSTER_DATABASE",
    )
    fal_api_pool_limit: int = Field(default=4, ge=1, le=1000, alias="RENDERQUEUE_FAL_API_POOL")
    reconcile_min_age_minutes: float = Field(
        default=10, ge=0, alias="RENDERQUEUE_RECONCILE_MIN_AGE_MINUTES"
    )
    reconcile_max_open_hours: float = Field(
        default=24, gt=0, alias="RENDERQUEUE_RECONCILE_MAX_OPEN_HOURS"
    )
    reconcile_concurrency: int = Field(
        default=16, ge=1, le=256, alias="RENDERQUEUE_RECONCILE_CONCURRENCY"
    )
    reconcile_max_rows: int = Field(
        default=20_000, ge=1, le=1_000_000, alias="RENDERQUEUE_RECONCILE_MAX_ROWS"
    )
    reconcile_result_window_minutes: float = Field(
        default=60, gt=0, alias="RENDERQUEUE_RECONCILE_RESULT_WINDOW_MINUTES"
    )
    reconcile_adopt: Literal["auto", "on", "off"] = Field(
        default="auto", alias="RENDERQUEUE_RECONCILE_ADOPT"
    )
    reconcile_adopt_lookback_minutes: float = Field(
        default=60, ge=0, le=90 * 24 * 60, alias="RENDERQUEUE_RECONCILE_ADOPT_LOOKBACK_MINUTES"
    )
    reconcile_adopt_window_hours: float = Field(
        default=24, gt=0, le=90 * 24, alias="RENDERQUEUE_RECONCILE_ADOPT_WINDOW_HOURS"
    )
    # --- ledger (renderqueue_pipeline/ledger/, docs/ledger.md) ---
    event_retention_days: float = Field(
        default=7, gt=0, le=3650, alias="RENDERQUEUE_EVENT_RETENTION_DAYS"
    )

    # --- spend (renderqueue_pipeline/spend/, docs/spend.md; FAL_ADMIN_KEY is above) ---
    fal_api_url: str = Field(default=FAL_API_URL, alias="RENDERQUEUE_FAL_API_URL")
    billing_grace_hours: float = Field(
        default=48.0, ge=0.0, le=24 * 90, alias="RENDERQUEUE_BILLING_GRACE_HOURS"
    )
    billing_threshold_percent: float = Field(
        default=0.5, ge=0.0, le=100.0, alias="RENDERQUEUE_BILLING_THRESHOLD_PERCENT"
    )

    # --- archive (renderqueue_pipeline/archive/, docs/archive.md) ---
    archive_hosts: str = Field(
        default="v3.fal.media,v3b.fal.media,fal.media", alias="RENDERQUEUE_ARCHIVE_HOSTS"
    )
    archive_loopback_hosts: str = Field(default="", alias="RENDERQUEUE_ARCHIVE_LOOPBACK_HOSTS")
    archive_max_bytes: int = Field(default=2 * 1024**3, ge=1, alias="RENDERQUEUE_ARCHIVE_MAX_BYTES")
    # a download's deadline: 60 s + its size at this rate (bytes/s), never past the lease
    archive_min_rate: float = Field(
        default=256 * 1024, gt=0, alias="RENDERQUEUE_ARCHIVE_MIN_BYTES_PER_SECOND"
    )
    # no byte for this long: the transfer is broken (the row is retried)
    archive_stall_seconds: float = Field(
        default=30.0, gt=0, le=600, alias="RENDERQUEUE_ARCHIVE_STALL_SECONDS"
    )
    archive_batch_rows: int = Field(default=500, ge=1, alias="RENDERQUEUE_ARCHIVE_BATCH_ROWS")
    archive_concurrency: int = Field(
        default=4, ge=1, le=64, alias="RENDERQUEUE_ARCHIVE_CONCURRENCY"
    )
    archive_max_attempts: int = Field(default=5, ge=1, alias="RENDERQUEUE_ARCHIVE_MAX_ATTEMPTS")
    archive_alert_minutes: float = Field(
        default=30.0, gt=0, alias="RENDERQUEUE_ARCHIVE_ALERT_MINUTES"
    )
    archive_deadline_hours: float = Field(
        default=24.0, gt=0, alias="RENDERQUEUE_ARCHIVE_DEADLINE_HOURS"
    )
    delete_fal_copy: bool = Field(default=False, alias="RENDERQUEUE_DELETE_FAL_COPY")

    @field_validator("*", mode="before")
    @classmethod
    def _clean_text(cls, value: object) -> object:
        """Strip surrounding whitespace (a mounted secret's newline); refuse control
        characters inside (httpx would quote the value in its error)."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return value
        value = value.strip()
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            raise ValueError(CONTROL_CHARACTER_MESSAGE)
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        scheme = urlparse(value).scheme.split("+")[0]
        if scheme not in ("postgres", "postgresql"):
            raise ValueError("expected a postgresql:// URL")
        return value

    @field_validator("fal_object_lifetime", mode="before")
    @classmethod
    def _lifetime(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
            return None
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            try:
                seconds = float(value)
            except ValueError:
                seconds = 0.0
            if not seconds > 0:
                raise ValueError("expected seconds > 0, or 'none' for no expiry")
            return seconds
        return value

    @field_validator("fal_start_timeouts_spec")
    @classmethod
    def _start_timeouts(cls, value: str) -> str:
        parse_start_timeouts(value)
        return value

    @property
    def fal_start_timeouts(self) -> dict[str, float]:
        """start_timeout seconds per endpoint id (RENDERQUEUE_FAL_START_TIMEOUTS)."""
        return parse_start_timeouts(self.fal_start_timeouts_spec)

    @field_validator("default_monthly_budget_usd", mode="before")
    @classmethod
    def _usd(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().removeprefix("$")
            return value or None
        return value

    @field_validator("alert_webhook_url", mode="before")
    @classmethod
    def _alert_url(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value in (None, ""):
            return None
        parsed = urlparse(str(value))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("expected an http(s):// URL")
        return value

    @field_validator("budget_alert_percents_spec")
    @classmethod
    def _alert_percents(cls, value: str) -> str:
        parse_alert_percents(value)
        return value

    @property
    def budget_alert_percents(self) -> tuple[int, ...]:
        """RENDERQUEUE_BUDGET_ALERT_PERCENTS as sorted distinct percents of the budget."""
        return parse_alert_percents(self.budget_alert_percents_spec)

    @field_validator("fal_jwks_url")
    @classmethod
    def _jwks_url(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty: unset it for fal's JWKS, or give an https:// URL")
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("expected an https:// URL")
        return value

    @field_validator("webhook_user_ids")
    @classmethod
    def _user_ids(cls, value: str | None) -> str | None:
        if value is not None and not [part for part in value.split(",") if part.strip()]:
            raise ValueError("expected comma-separated fal user ids (unset it to accept any)")
        return value

    @field_validator("webhook_url", "fal_rest_url", "fal_api_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("expected an http(s):// URL")
        return value

    @property
    def fal_admin_secret(self) -> SecretStr | None:
        """The key for fal's admin calls: FAL_ADMIN_KEY, falling back to FAL_KEY."""
        return self.fal_admin_key or self.fal_key

    @property
    def webhook_user_id_set(self) -> frozenset[str] | None:
        """FAL_WEBHOOK_USER_IDS as a set; None when unset (any fal account is accepted)."""
        if self.webhook_user_ids is None:
            return None
        return frozenset(part.strip() for part in self.webhook_user_ids.split(",") if part.strip())

    @property
    def home_dir(self) -> Path:
        """RENDERQUEUE_HOME as an absolute path (created on demand by its users)."""
        return self.home.expanduser().resolve()

    @property
    def storage(self) -> str:
        """Where archived outputs and reports go (any fsspec URL)."""
        return self.storage_url or default_storage_url(self.home_dir)

    @property
    def prompts(self) -> str:
        """The prompts inbox (any fsspec URL of a folder)."""
        return self.prompts_url or default_prompts_url(self.home_dir)

    def value_of(self, variable: str) -> object:
        """The value in effect for the environment variable `variable`: its default when
        unset (the home-relative folders included), a secret unwrapped for the client that
        needs it; None when it has no value. The Dagster resources are built from this."""
        if variable == "RENDERQUEUE_STORAGE_URL":
            return self.storage
        if variable == "RENDERQUEUE_PROMPTS_URL":
            return self.prompts
        value = getattr(self, _ENV_TO_FIELD[variable])
        return value.get_secret_value() if isinstance(value, SecretStr) else value


def default_storage_url(home: Path) -> str:
    """RENDERQUEUE_STORAGE_URL when unset: a folder under RENDERQUEUE_HOME."""
    return f"file://{home.expanduser().resolve() / 'archive'}"


def default_prompts_url(home: Path) -> str:
    """RENDERQUEUE_PROMPTS_URL when unset: the inbox folder under RENDERQUEUE_HOME."""
    return f"file://{home.expanduser().resolve() / 'prompts' / 'inbox'}"


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***` (safe to print or log)."""
    try:
        parsed = urlparse(url)
        password = parsed.password
    except ValueError:
        return "<unparseable URL>"
    if not password:
        return url
    user = parsed.username or ""
    host = parsed.netloc.rsplit("@", 1)[1]
    return urlunparse(parsed._replace(netloc=f"{user}:***@{host}"))


_URL_FIELDS = frozenset(
    {
        "database_url",
        "fal_jwks_url",
        "fal_rest_url",
        "fal_api_url",
        "webhook_url",
        "storage_url",
        "prompts_url",
    }
)

_FIELD_TO_ENV = {name: (field.alias or name) for name, field in Settings.model_fields.items()}
_URL_ENVS = frozenset(_FIELD_TO_ENV[name] for name in _URL_FIELDS)
_ENV_TO_FIELD = {env: name for name, env in _FIELD_TO_ENV.items()}


def load_settings() -> Settings:
    """Read the environment now; raise ConfigError with one readable line on a bad value."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        env = _FIELD_TO_ENV.get(field, field)
        message = first["msg"].removeprefix("Value error, ")
        got = first.get("input")
        if field in SECRET_FIELDS or message == CONTROL_CHARACTER_MESSAGE:
            raise ConfigError(f"{env}: {message} (value not shown)") from None
        if "RENDERQUEUE_ALERT_WEBHOOK_URL" in (field, env):
            got = "<redacted>"  # its token is in the path: never echo it
        elif (field in _URL_FIELDS or env in _URL_ENVS) and isinstance(got, str):
            got = redact_url(got)  # a bad DATABASE_URL may still carry a real password
        raise ConfigError(f"{env}: {message} (got {got!r})") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings for this process (cached; tests call `get_settings.cache_clear()`)."""
    return load_settings()
