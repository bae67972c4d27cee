"""The data side of a run: examples and tasks, the demo task, prompts and their token budget, ``--data`` files,
control runs."""
