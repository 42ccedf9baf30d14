"""All configuration, read from the environment in one place.

Every knob is an environment variable; a wrong value becomes one clear line
(`ConfigError`) naming the variable and what was expected, never a traceback.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_JWKS_URL = "https://rest.alpha.fal.ai/.well-known/jwks.json"


class ConfigError(Exception):
    """A setting has a value we cannot use; the message names the variable."""


class Settings(BaseSettings):
    """renderqueue's settings; each field maps to the environment variable in its alias."""

    # aliases only: with populate_by_name the field `home` would read $HOME
    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    home: Path = Field(default=Path(".renderqueue"), alias="RENDERQUEUE_HOME")
    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    fal_key: SecretStr | None = Field(default=None, alias="FAL_KEY")
    fal_jwks_url: str = Field(default=DEFAULT_JWKS_URL, alias="FAL_JWKS_URL")
    webhook_url: str | None = Field(default=None, alias="RENDERQUEUE_WEBHOOK_URL")
    webhook_flushers: int = Field(default=1, ge=1, le=32, alias="RENDERQUEUE_WEBHOOK_FLUSHERS")
    storage_url: str | None = Field(default=None, alias="RENDERQUEUE_STORAGE_URL")
    prompts_url: str | None = Field(default=None, alias="RENDERQUEUE_PROMPTS_URL")
    # reports: the first month of the monthly report partitions (YYYY-MM)
    reports_start_month: str = Field(
        default="2026-01", pattern=r"^\d{4}-(0[1-9]|1[0-2])$", alias="RENDERQUEUE_REPORTS_START"
    )

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        scheme = urlparse(value).scheme.split("+")[0]
        if scheme not in ("postgres", "postgresql"):
            raise ValueError("expected a postgresql:// URL")
        return value

    @field_validator("fal_jwks_url", "webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("expected an http(s):// URL")
        return value

    @property
    def home_dir(self) -> Path:
        """RENDERQUEUE_HOME as an absolute path (created on demand by its users)."""
        return self.home.expanduser().resolve()

    @property
    def storage(self) -> str:
        """Where archived outputs and reports go (any fsspec URL)."""
        return self.storage_url or f"file://{self.home_dir / 'archive'}"

    @property
    def prompts(self) -> str:
        """The prompts inbox (any fsspec URL of a folder)."""
        return self.prompts_url or f"file://{self.home_dir / 'prompts' / 'inbox'}"


_FIELD_TO_ENV = {name: (field.alias or name) for name, field in Settings.model_fields.items()}


def load_settings() -> Settings:
    """Read the environment now; raise ConfigError with one readable line on a bad value."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        env = _FIELD_TO_ENV.get(field, field)
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{env}: {message} (got {first.get('input')!r})") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings for this process (cached; tests call `get_settings.cache_clear()`)."""
    return load_settings()
