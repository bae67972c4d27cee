"""Benchmark tasks, evaluators and a sandbox for generated code, as unisd plugins."""
