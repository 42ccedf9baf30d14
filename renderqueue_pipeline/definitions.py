"""The Dagster code location: every domain folder under defs/, plus the shared resources.

`dg check defs`, `dg list defs`, `dagster dev` and `dagster-webserver`/`dagster-daemon`
find it through `[tool.dg.project]` in pyproject.toml; `workspace.yaml` loads the same
module. Each domain (`defs/<domain>/`) owns its jobs, sensors, schedules and assets; the
resources are built in one place, `defs/resources.py`, from the environment.
"""

from pathlib import Path

import dagster as dg

from renderqueue_pipeline.defs.resources import env_resources
from renderqueue_pipeline.redact import install_log_redaction


@dg.definitions
def defs() -> dg.Definitions:

    install_log_redaction()  # our loggers never print a configured secret
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(resources=env_resources()),
    )
