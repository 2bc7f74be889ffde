"""Environment variables that connect the cluster glue to the training processes.

Kept in a module without heavy imports, so the CLI can name them without importing torch.
"""

THREADS_ENV = "AESELECT_NUM_THREADS"  # CPU threads per experiment: cores / parallel experiments
