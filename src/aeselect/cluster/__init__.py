"""Cluster glue: SLURM submission, queue draining, and one sweep shared between jobs."""
