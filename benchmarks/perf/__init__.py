"""Performance measurements (step time per method)."""
