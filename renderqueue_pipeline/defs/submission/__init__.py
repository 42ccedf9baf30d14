"""Submission: the prompts inbox sensor, `submit_batch` and `cancel_batch`."""
