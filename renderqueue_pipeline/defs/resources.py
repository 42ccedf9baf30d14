"""Every resource a run uses, built in one place from the environment.

Each field of a resource is named by the `dg.EnvVar` it comes from (`from_env`). The
values are read when a run (or a sensor tick) starts, validated the way the CLI
validates them (`Settings`: one readable line naming the variable), and handed to the
resource; ops and assets pass them down as explicit arguments. The resources have no
run config: the launchpad never offers them and a secret never lands in a run's
stored config (docs/dagster.md "Configuration").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import dagster as dg
from dagster import ConfigurableResource

from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.server import database_url
from renderqueue_pipeline.defs.batch.resources import PromptsInbox
from renderqueue_pipeline.defs.reports.resources import ReportStorage
from renderqueue_pipeline.settings import load_settings

if TYPE_CHECKING:
    from renderqueue_pipeline.settings import Settings

R = TypeVar("R", bound=ConfigurableResource)


class LedgerDatabase(ConfigurableResource):
    """The ledger's Postgres (DATABASE_URL); empty `url` means the embedded server of
    `renderqueue dev` / `demo` under RENDERQUEUE_HOME."""

    url: str = ""

    def resolved_url(self) -> str:
        return self.url or database_url()

    def connect(self) -> LedgerConnection:
        return connect(self.resolved_url())


def from_env(cls: type[R], description: str, **fields: dg.EnvVar) -> dg.ResourceDefinition:
    """`cls` with each field set from its environment variable when a run starts.

    An unset variable takes the product's default (Settings'; the embedded server for
    DATABASE_URL). No config schema: nothing here is run config, so nothing shows in the
    launchpad's scaffold and no secret is ever stored with a run.
    """

    def build(_context: dg.InitResourceContext) -> R:

        # the run's environment, read now; a bad value is one line naming its variable
        return from_settings(cls, load_settings(), **fields)

    variables = ", ".join(sorted({var.env_var_name for var in fields.values()}))
    return dg.ResourceDefinition(
        resource_fn=build, config_schema={}, description=f"{description} ({variables})"
    )


def from_settings(cls: type[R], settings: Settings, **fields: dg.EnvVar) -> R:
    """`cls` with each field set to the value `settings` holds for its variable (unset
    variables: the settings' default; no value at all: the field's default)."""
    values = {field: settings.value_of(var.env_var_name) for field, var in fields.items()}
    return cls(**{field: value for field, value in values.items() if value is not None})


class EnvResource(ConfigurableResource):
    """A resource whose fields are listed in `ENV` with the variable each comes from."""

    ENV: ClassVar[dict[str, dg.EnvVar]] = {}

    @classmethod
    def from_settings(cls: type[R], settings: Settings) -> R:
        """The resource as the environment in `settings` configures it (tests, the demo)."""
        return from_settings(cls, settings, **cls.ENV)

    @classmethod
    def definition(cls, description: str) -> dg.ResourceDefinition:
        """The resource for the code location: its `ENV` read when a run starts."""
        return from_env(cls, description, **cls.ENV)


def env_resources() -> Mapping[str, Any]:
    """The code location's resources, each field from its environment variable."""
    # cycle: alerts', archive's and spend's resources build on this module
    from renderqueue_pipeline.defs.alerts.resources import AlertsResource  # noqa: PLC0415
    from renderqueue_pipeline.defs.archive.resources import ArchiveResource  # noqa: PLC0415
    from renderqueue_pipeline.defs.spend.resources import BillingCheckResource, FalPlatformResource  # noqa: PLC0415

    return {
        "ledger": from_env(LedgerDatabase, "The ledger's Postgres", url=dg.EnvVar("DATABASE_URL")),
        "prompts_inbox": from_env(
            PromptsInbox, "The prompts inbox", url=dg.EnvVar("RENDERQUEUE_PROMPTS_URL")
        ),
        "report_storage": from_env(
            ReportStorage, "Where report files go", url=dg.EnvVar("RENDERQUEUE_STORAGE_URL")
        ),
        "fal_platform": from_env(
            FalPlatformResource,
            "fal's Platform APIs",
            admin_key=dg.EnvVar("FAL_ADMIN_KEY"),
            key=dg.EnvVar("FAL_KEY"),
            api_url=dg.EnvVar("RENDERQUEUE_FAL_API_URL"),
        ),
        "archive": ArchiveResource.definition("The archive"),
        "alerts": AlertsResource.definition("Where alerts go"),
        "billing_check": BillingCheckResource.definition("The billing check's limits"),
    }
