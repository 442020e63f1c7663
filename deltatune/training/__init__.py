"""Training: data, the training loop, checkpoints, metrics."""
