"""The bundled demo model: its task, tokenizer, training script and held-out check."""
