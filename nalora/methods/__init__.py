"""Method registry; importing this package registers every built-in method."""

# Registration side effects: one module per family of methods.
from nalora.methods import full, nalora, peft_lora  # noqa: E402,F401
from nalora.methods.registry import Method, get_method, list_methods, register_method

__all__ = ["Method", "get_method", "list_methods", "register_method"]
