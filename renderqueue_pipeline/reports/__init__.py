"""Monthly spend reports for analysts: rollups, report tables, checks, files and a chart.

Plain Python over the ledger (no Dagster here); `defs/reports/` is the thin layer over it.
"""
