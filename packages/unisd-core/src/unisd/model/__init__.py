"""Models: loading and LoRA, scoring forwards, teacher views, generation backends, export."""
