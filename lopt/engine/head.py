"""The task loss at the head: mean cross-entropy over the label tokens, from the final norm's output.

A plain linear head goes through ``lopt_kernels``' fused linear cross-entropy (or its reference), which never
materialises the logits; any other head (a LoRA adapter, a quantised linear) runs as a module, so what it adds
to the weight is never skipped, at the price of materialised logits.
"""

from __future__ import annotations

import torch

import lopt_kernels

from lopt.data.sft import IGNORE_INDEX


def head_loss(head, normed_hidden, labels, *, fused: bool) -> torch.Tensor:
    """Mean cross-entropy over the label tokens of ``head`` on ``normed_hidden`` (``fused``: the Triton kernel)."""
    hidden, labels = normed_hidden.reshape(-1, normed_hidden.shape[-1]), labels.reshape(-1)
    try:
        weight, bias = lopt_kernels.lm_head_weight(head)
    except ValueError:
        logits = head(hidden).float()
        losses = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        return losses.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)
    op = lopt_kernels.linear_cross_entropy if fused else lopt_kernels.linear_cross_entropy_reference
    return op(hidden, weight, labels, bias=bias)
