"""Activation recomputation: a layer's (or its MLP's) activations recomputed in backward instead of stored.

``LoPTModel(recompute=...)`` wraps the forwards per instance (``"full"``: every layer; ``"selective"``: only
the MLPs, the largest intermediates). Hugging Face's own gradient checkpointing (``gradient_checkpointing_enable``)
is recognised too (``hf_checkpoints``): its reentrant form needs a block's input to require grad.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.utils.checkpoint


def checkpointed(forward):
    """Wrap a module's forward so its activations are recomputed in backward instead of stored."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_recompute(layers, recompute: str) -> None:
    """Wrap layer (or MLP) forwards in activation checkpointing, per instance."""
    if recompute == "none":
        return
    for layer in layers:
        module = layer if recompute == "full" else layer.mlp
        module.forward = checkpointed(module.forward)


def hf_checkpoints(layer: nn.Module) -> bool:
    """Whether Hugging Face's gradient checkpointing is on for this layer (``gradient_checkpointing_enable``)."""
    return bool(getattr(layer, "gradient_checkpointing", False)) and layer.training
