"""Training: the loop, optimizers and LR schedules."""
