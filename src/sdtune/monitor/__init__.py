"""Watching a run: console progress, metrics.jsonl and TensorBoard."""
