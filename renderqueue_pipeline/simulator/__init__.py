"""A local fal queue simulator that unmodified fal-client cannot tell from fal."""
