"""Diffusion math: noise schedules, timestep sampling, training targets and loss weights."""
