"""``lopt train`` on one rank: the trainer and what it owns (optimizers, checkpoints, the run
directory, host offload, self-replay)."""
