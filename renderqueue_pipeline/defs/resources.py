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

from renderqueue_pipeline.batch.budget import default_budget_micros
from renderqueue_pipeline.db import LedgerConnection
from renderqueue_pipeline.db.connect import connect
from renderqueue_pipeline.db.server import database_url
from renderqueue_pipeline.defs.alerts.resources import AlertsResource
from renderqueue_pipeline.defs.archive.resources import ArchiveResource
from renderqueue_pipeline.defs.batch.resources import PromptsInbox
from renderqueue_pipeline.defs.env_resource import EnvResource, from_settings
from renderqueue_pipeline.defs.reports.resources import ReportStorage
from renderqueue_pipeline.defs.spend.resources import BillingCheckResource, FalPlatformResource
from renderqueue_pipeline.fal_gateway import FalGateway
from renderqueue_pipeline.fal_platform import FalPlatform
from renderqueue_pipeline.settings import load_settings

if TYPE_CHECKING:
    from renderqueue_pipeline.fal_gateway import FalGateway
    from renderqueue_pipeline.settings import Settings

R = TypeVar("R", bound=ConfigurableResource)


class LedgerDatabase(EnvResource):
    """The ledger's Postgres (DATABASE_URL); empty `url` means the embedded server of
    `renderqueue dev` / `demo` under RENDERQUEUE_HOME. With the default monthly budget it
    admits users without their own against (RENDERQUEUE_DEFAULT_MONTHLY_BUDGET_USD;
    empty: none)."""

    ENV: ClassVar[dict[str, dg.EnvVar]] = {
        "url": dg.EnvVar("DATABASE_URL"),
        "default_budget_usd": dg.EnvVar("RENDERQUEUE_DEFAULT_MONTHLY_BUDGET_USD"),
    }

    url: str = ""
    default_budget_usd: str = ""

    def default_limit_micros(self) -> int | None:
        """The default monthly budget in micro-dollars; None: no default budget."""
        return default_budget_micros(self.default_budget_usd)

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


class FalConnection:
    """fal for one run: gateways to its queue API and its Platform API client, configured
    by the settings read when the run started (FAL_KEY, FAL_ADMIN_KEY,
    RENDERQUEUE_WEBHOOK_URL, ...). A plain object, not config: a key is never run config."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def __repr__(self) -> str:  # never show a key
        return "FalConnection()"

    @property
    def settings(self) -> Settings:
        """The settings read when the run started (the domain's options come from them)."""
        return self._settings

    def gateway(self, max_concurrency: int | None = None) -> FalGateway:
        """A gateway with `max_concurrency` calls in flight (None: the gateway's default);
        the domain's gateway_factory."""
        # fal-client reads FAL_QUEUE_RUN_HOST when imported: only once a run needs it

        if max_concurrency is None:
            return FalGateway.from_settings(self._settings)
        return FalGateway.from_settings(self._settings, max_concurrency=max_concurrency)

    def platform(self) -> FalPlatform:
        """The Platform API client (the domain's platform_factory)."""
        return FalPlatform.from_settings(self._settings)


def fal_connection() -> dg.ResourceDefinition:
    """The `fal` resource: the run's environment read when it starts (a bad value is one
    line naming its variable)."""

    def build(_context: dg.InitResourceContext) -> FalConnection:

        return FalConnection(load_settings())

    return dg.ResourceDefinition(
        resource_fn=build,
        config_schema={},
        description="fal's queue and Platform APIs (FAL_KEY, FAL_ADMIN_KEY, "
        "RENDERQUEUE_WEBHOOK_URL, RENDERQUEUE_FAL_*)",
    )


def env_resources() -> Mapping[str, Any]:
    """The code location's resources, each field from its environment variable."""

    return {
        "ledger": from_env(
            LedgerDatabase, "The ledger's Postgres and default budget", **LedgerDatabase.ENV
        ),
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
        "fal": fal_connection(),
        "archive": from_env(ArchiveResource, "The archive", **ArchiveResource.ENV),
        "alerts": from_env(AlertsResource, "Where alerts go", **AlertsResource.ENV),
        "billing_check": from_env(
            BillingCheckResource, "The billing check's limits", **BillingCheckResource.ENV
        ),
    }
