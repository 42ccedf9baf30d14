"""renderqueue: a Postgres-backed render queue and spend ledger for fal.ai generation endpoints."""

__version__ = "0.1.0"

import warnings

# platformdirs warns on every server lookup when XDG_RUNTIME_DIR is unset (containers, CI).
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
