"""Sample data for `renderqueue dev` and `renderqueue demo --headless`."""
