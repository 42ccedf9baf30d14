"""Dagster definitions by domain; each stays thin and calls plain, separately tested code."""
