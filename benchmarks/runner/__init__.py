"""The runner: suites -> grid of runs -> training -> one JSON per run (resumable)."""
