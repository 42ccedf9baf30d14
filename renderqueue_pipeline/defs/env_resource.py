"""The base of a resource whose fields come from environment variables.

Kept apart from `defs/resources.py` (which assembles every domain's resources) so the
per-domain resource modules import this base and `defs/resources.py` imports them: one
direction only, no import cycle.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, ClassVar, TypeVar

import dagster as dg
from dagster import ConfigurableResource

if TYPE_CHECKING:
    from renderqueue_pipeline.settings import Settings

R = TypeVar("R", bound=ConfigurableResource)


def from_settings(cls: type[R], settings: Settings, **fields: dg.EnvVar) -> R:
    """`cls` with each field set to the value `settings` holds for its variable (unset
    variables: the settings' default; no value at all: the field's default)."""
    values = {field: settings.value_of(var.env_var_name) for field, var in fields.items()}
    return cls(**{field: _config(value) for field, value in values.items() if value is not None})


def _config(value: object) -> object:
    """`value` as Dagster config holds it: an amount of money (Decimal) as its exact text."""
    return str(value) if isinstance(value, Decimal) else value


class EnvResource(ConfigurableResource):
    """A resource whose fields are listed in `ENV` with the variable each comes from; the
    code location's definition is `defs.resources.from_env(cls, ..., **cls.ENV)`."""

    ENV: ClassVar[dict[str, dg.EnvVar]] = {}

    @classmethod
    def from_settings(cls: type[R], settings: Settings) -> R:
        """The resource as the environment in `settings` configures it (tests, the demo)."""
        return from_settings(cls, settings, **cls.ENV)
