"""Optimizer parameter groups: the lower and upper halves at their learning rates, no decay on vectors, and the
same groups split by the block that owns each parameter (one optimizer per block can step a block alone)."""

from __future__ import annotations


def adamw_groups(halves, weight_decay: float) -> list[dict]:
    """``halves``: ``(name, params, lr)`` each. Per half, the trainable matrices with ``weight_decay`` and the
    trainable vectors (norms, biases) without, as ``name`` and ``name/no_decay``; empty groups are left out."""
    groups = []
    for name, params, group_lr in halves:
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for suffix, members, wd in (("", decay, weight_decay), ("/no_decay", no_decay, 0.0)):
            if members:
                groups.append({"name": name + suffix, "params": members, "lr": group_lr, "weight_decay": wd})
    return groups


def split_by_block(groups: list[dict], owner: dict[int, int], num_blocks: int) -> list[list[dict]]:
    """``groups`` split per block: ``owner`` maps ``id(param)`` to its block; unlisted ones are the last block's."""
    last = num_blocks - 1
    per_block = [[] for _ in range(num_blocks)]
    for group in groups:
        for b in range(num_blocks):
            params = [p for p in group["params"] if owner.get(id(p), last) == b]
            if params:
                per_block[b].append({**group, "params": params})
    return per_block
