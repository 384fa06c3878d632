"""The run's length and its learning-rate schedule: linear warm-up, then cosine down to ``--min-lr-ratio``.

The rate of step ``s`` depends only on ``s`` and the run's settings, so a resumed run continues on the
same curve. (``--schedule`` is the other schedule: the order in which blocks and micro-batches run.)
"""

from __future__ import annotations

import math

from lopt.config import TrainConfig


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The optimizer steps the run trains: ``--max-steps``, or ``--epochs`` over the data, whichever is fewer."""
    limits = [cfg.max_steps] if cfg.max_steps else []
    if cfg.epochs:
        limits.append(cfg.epochs * steps_per_epoch)
    return min(limits)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak rate for optimizer step ``step`` (0-based): linear warm-up, then cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LrSchedule:
    """The multiplier of each group's peak rate at each step; ``--warmup-steps`` defaults to 5% of the run."""

    def __init__(self, cfg: TrainConfig, total: int):
        self.total_steps, self.min_ratio = total, cfg.min_lr_ratio
        self.warmup_steps = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total))

    def factor(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.total_steps, self.min_ratio)
