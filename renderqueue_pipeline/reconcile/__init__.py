"""The reconciler: rows whose webhook was lost (or empty) brought to fal's truth."""

from renderqueue_pipeline.reconcile.core import ReconcileOptions, ReconcileReport, reconcile

__all__ = ["ReconcileOptions", "ReconcileReport", "reconcile"]
