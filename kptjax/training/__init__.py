"""Training: the step (loss, accumulation, update), optimizer, checkpoints, run checks."""
