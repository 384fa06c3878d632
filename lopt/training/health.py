"""The finite check: whether a step's loss, gradients and update left the run healthy.

After every update one fused reduction per dtype checks that the weights and optimizer state are finite;
it is summed with the step's losses, so the check costs no extra host sync. A non-finite loss or gradient
means the step's weights were bad (the checkpoint they came from goes); a non-finite update means the step
wrecked them (the checkpoint stays). The Trainer judges each step with these (``Trainer.end_step``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lopt.errors import NonFiniteLossError


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """1.0 if every tensor is finite, else 0.0: a device scalar, no sync. One fused norm per dtype and device
    (a non-finite element, or a norm that overflows, is not finite)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    flags = [torch.stack(torch._foreach_norm(group)).isfinite().all() for group in groups.values()]
    return torch.stack(flags).all().float()


def bad_loss(step: int, loss: float, task: float, aux: float, norm: float, grads_finite: bool) -> str | None:
    """What went wrong with step ``step``'s loss or gradients (its weights gave them), or None."""
    if math.isfinite(loss) and math.isfinite(norm) and grads_finite:
        return None
    return f"non-finite loss at step {step} (task {task:.4g}, aux {aux:.4g})"


def bad_update(step: int) -> str:
    return f"non-finite weights or optimizer state after the update of step {step}"


def divergence_error(what: str, kept: Path | None, silent: bool) -> NonFiniteLossError:
    """The error a diverged run stops with; ``kept``: the last checkpoint from before the divergence."""
    if kept is not None:
        advice = (f"{kept} (the last checkpoint before the divergence) is kept; lower --lr (or clip harder with a "
                  "smaller --max-grad-norm), then --resume")
    else:
        advice = "no checkpoint from before it exists; start over (--overwrite) with a lower --lr"
    error = NonFiniteLossError(f"{what}; training stopped and {advice}")
    error.silent = silent  # every rank sees the same summed loss: rank 0 says it
    return error
