"""Evaluation: sampling, validation loss, the digits judge."""
