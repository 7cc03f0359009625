"""Scoring: batching, the shared-prefix kernels, log-probs over verbalizers, calibration, heads."""
