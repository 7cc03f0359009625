"""Training: the loop, its batches, data-parallel set-up and experiment trackers."""
