"""Cluster glue: GPU binding for parallel experiments, SLURM submission and queue draining."""
