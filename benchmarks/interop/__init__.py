"""Interoperability checks: what NA-LoRA saves is usable by other tools (lm-evaluation-harness)."""
