"""Scoring shared by training and evaluation: per-image metrics, pictures, the val-set pass."""
