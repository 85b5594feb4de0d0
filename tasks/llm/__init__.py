"""Built-in language tasks (causal LM): Python modules and YAML task files in this folder."""
