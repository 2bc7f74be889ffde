"""Evaluation: the metrics that rank candidate autoencoders (see `metrics`)."""
