"""Built-in vision tasks: image QA over class names (composed or hub VLM) and linear probes."""
