"""The loss-curve PNG written next to metrics.jsonl."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_losses(rows: Sequence[dict], path: str | Path) -> Path:
    """Task loss (with the total objective) and reconstruction loss against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in rows]
    fig, (task_ax, aux_ax) = plt.subplots(1, 2, figsize=(10, 4))
    task_ax.plot(steps, [r["task_loss"] for r in rows], label="task loss")
    task_ax.plot(steps, [r["loss"] for r in rows], label="loss (task + lambda_aux * aux)", alpha=0.6)
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        task_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out task loss")
    task_ax.set(xlabel="step", ylabel="loss", title="Task loss")
    task_ax.legend()
    aux_ax.plot(steps, [r["aux_loss"] for r in rows], color="tab:green")
    aux_ax.set(xlabel="step", ylabel="mean reconstruction loss", title="Auxiliary (reconstruction) loss")
    for ax in (task_ax, aux_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
