"""Training: the loss, the loop, DDP, and surviving preemption."""
