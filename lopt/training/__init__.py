"""``lopt train`` on one rank: setup, the Trainer and its parts (step kinds, optimizers and schedule, the
finite check, checkpoints, measures, log, signals), the run directory, host offload, self-replay."""
