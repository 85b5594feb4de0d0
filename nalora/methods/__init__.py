"""Method registry; importing this package registers every built-in method."""

from nalora.methods.registry import Method, get_method, list_methods, register_method

# Registration side effects: one module per family of methods.
from nalora.methods import peft_lora, full, nalora  # noqa: E402,F401

__all__ = ["Method", "get_method", "list_methods", "register_method"]
