"""renderqueue: a Postgres-backed render queue and spend ledger for fal.ai generation endpoints."""

__version__ = "0.1.0"
