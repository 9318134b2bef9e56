"""Checkpoints: the atomic, verified store."""
