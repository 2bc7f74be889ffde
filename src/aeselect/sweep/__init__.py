"""Sweeps: a phase file's experiments, their DVC state (queued, run, fresh or stale), local runs."""
