"""The task registry and the built-in benchmark tasks."""
