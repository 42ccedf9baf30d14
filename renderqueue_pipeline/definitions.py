"""The Dagster code location: every domain folder under defs/, plus the shared resources.

`dg check defs`, `dg list defs`, `dagster dev` and `dagster-webserver`/`dagster-daemon`
find it through `[tool.dg.project]` in pyproject.toml; `workspace.yaml` loads the same
module. Each domain (`defs/<domain>/`) owns its jobs, sensors, schedules and assets; the
resources are built in one place, `defs/resources.py`, from the environment.

The defs folder is loaded from the imported package itself, not through the dg project
file: that file is in the repository only, so an installed wheel (a container image built
with `pip install .`) would not find it (tests/test_wheel.py runs the demo that way).
"""

from pathlib import Path

import dagster as dg

import renderqueue_pipeline.defs as defs_package
from renderqueue_pipeline.defs.resources import env_resources
from renderqueue_pipeline.redact import install_log_redaction


@dg.definitions
def defs() -> dg.Definitions:

    install_log_redaction()  # our loggers never print a configured secret
    return dg.Definitions.merge(
        dg.ComponentTree.from_module(
            defs_module=defs_package, project_root=Path(__file__).resolve().parent.parent
        ).build_defs(),
        dg.Definitions(resources=env_resources()),
    )
