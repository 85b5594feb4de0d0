"""NA-LoRA Bench: asset cache, composed VLM, runner and reporting built on the ``nalora`` library."""
