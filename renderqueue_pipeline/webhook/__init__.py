"""The webhook receiver: verify fal's signature, record, apply, answer. Nothing slow."""
