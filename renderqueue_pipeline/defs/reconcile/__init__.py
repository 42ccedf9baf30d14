"""The reconciler in Dagster: the `reconcile_ledger` job and its 5-minute schedule."""
