"""The interface between the cluster glue and the training processes: environment variables in,
the preemption exit code out.

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
RESUME_DIR_ENV = "AESELECT_RESUME_DIR"  # where preempted trainings keep their resume snapshots
PIDFILE_ENV = "AESELECT_PIDFILE"  # set by aeselect.cluster.drain for each experiment
# A budget-aware sweep's rungs (aeselect.training.rungs): the steps at which the training pauses
# with its per-image val scores in RUNG_DIR_ENV and its resume snapshot, set by the drainer.
RUNGS_ENV = "AESELECT_RUNGS"  # comma-separated steps, e.g. "50,100"
RUNG_DIR_ENV = "AESELECT_RUNG_DIR"  # where the rung scores go: rung_<step>.csv
GPU_LOCK_DIR_ENV = "AESELECT_GPU_LOCK_DIR"  # lock files of aeselect.gpu's GPU claims

# The train stage's exit status after a preemption snapshot (EX_TEMPFAIL: try again later).
PREEMPTED_EXIT_CODE = 75
# ...and after pausing at a rung: not a failure (no experiment is recorded), not a preemption
# (the drainer decides at the rung whether it resumes).
RUNG_EXIT_CODE = 76

# What `phase submit` exports to hpc/drain.sbatch (read there as shell variables).
PHASE_ENV = "AESELECT_PHASE"  # the phase the job drains
JOBS_ENV = "AESELECT_JOBS"  # experiments at a time on the node: the profile's parallel_jobs
PLAN_ENV = "AESELECT_PLAN"  # a shared sweep's plan id (refs/aeselect/plans/<id> on the remote)
PROFILE_ENV = "AESELECT_PROFILE"  # the profile whose share the job drains
GIT_URL_ENV = "AESELECT_GIT_URL"  # the Git remote the job clones the plan's commit from
WORKDIR_ENV = "AESELECT_WORKDIR"  # where the job keeps its own clone, on storage its node sees
