"""What a run writes and shows: checkpoints, metrics.jsonl, atomic writes, the run directory, the model card,
terminal reporting, trackers, stop signals."""
