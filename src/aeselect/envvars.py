"""Environment variables that connect the cluster glue to the training processes.

Kept in a module without heavy imports, so the CLI can name them without importing torch.
"""

THREADS_ENV = "AESELECT_NUM_THREADS"  # CPU threads per experiment: cores / parallel experiments
# Training processes (DDP ranks) on this node, one per GPU: set by the drainer when one experiment
# gets the whole allocation, or by hand. Hardware, not a param: it never changes what is trained.
NPROC_ENV = "AESELECT_NPROC_PER_NODE"
# Nodes the one experiment of the job trains on: set by the drainer from SLURM_NNODES for a
# one-experiment phase (the final training) on a multi-node allocation; the train stage's launcher
# then starts the other nodes' ranks with srun.
NNODES_ENV = "AESELECT_NNODES"
