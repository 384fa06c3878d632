"""What a decoder layer takes besides the hidden states, built once per batch: positions and attention masks.

``LoPTModel.layer_inputs`` runs the layers itself (block by block, not through the model's forward), so it
builds what the model's forward would: position ids that count from 0 in each row and restart where a packed
example starts, and per attention kind (full or sliding window) an additive mask, or None where SDPA's own
causal path is exact.
"""

from __future__ import annotations

import torch


def position_ids(shape, device, document_ids=None, given=None) -> torch.Tensor:
    """``[batch, seq]`` positions: the caller's ``given`` ones, else from 0 in each row, restarting where a packed
    example starts (``document_ids``)."""
    batch_size, seq_len = shape
    idx = torch.arange(seq_len, device=device)
    if given is not None:
        return given.expand(batch_size, -1)
    if document_ids is None:
        return idx.unsqueeze(0).expand(batch_size, -1)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def layer_type(config, index: int) -> str:
    """Layer ``index``'s attention kind (``config.layer_types``; "full_attention" where there are none)."""
    layer_types = getattr(config, "layer_types", None)
    return layer_types[index] if layer_types else "full_attention"


def layer_masks(config, num_layers: int, attention_mask, document_ids, seq_len, device, dtype) -> dict:
    """``{attention kind: additive mask or None}`` for every kind among the ``num_layers`` layers."""
    kinds = {layer_type(config, i) for i in range(num_layers)}
    return {kind: additive_mask(config, kind, attention_mask, document_ids, seq_len, device, dtype) for kind in kinds}


def additive_mask(config, kind, attention_mask, document_ids, seq_len, device, dtype):
    """Additive [B, 1, T, T] mask, or None where SDPA's own causal path is exact (no padding or packing)."""
    window = getattr(config, "sliding_window", None) if kind == "sliding_attention" else None
    # One host sync per step (not per layer) buys SDPA's fused causal path for unpadded batches.
    no_padding = attention_mask is None or bool(attention_mask.all())
    sdpa = config._attn_implementation == "sdpa"
    if no_padding and document_ids is None and window is None and sdpa:
        return None
    idx = torch.arange(seq_len, device=device)
    allowed = idx[None, :] <= idx[:, None]
    if window is not None:
        allowed &= idx[:, None] - idx[None, :] < window
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    if document_ids is not None:
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])[:, None]
    # A fully masked query row (padding) would give NaN under -inf; the dtype's min keeps it finite.
    return torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
