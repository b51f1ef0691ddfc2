"""Training: the loop, the step, the optimizer, checkpoints and metrics."""
