"""The batch domain in Dagster: the prompts inbox sensor, `submit_batch` and `cancel_batch`."""
