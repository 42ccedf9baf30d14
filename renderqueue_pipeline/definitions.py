"""The Dagster code location (`dagster dev -w workspace.yaml`)."""

from dagster import Definitions

from renderqueue_pipeline.defs.ledger.jobs import ledger_status_job
from renderqueue_pipeline.defs.resources import default_resources

defs = Definitions(jobs=[ledger_status_job], resources=default_resources())
