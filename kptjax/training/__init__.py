"""Training: the run (trainer: build, init, loop; metrics_writer), the one step for every
model (step) and its loss terms (losses), optimizer (optim), checkpoints, pre-run checks
(preflight) and divergence reports."""
