"""A batch as the engine reads it: its tensors, with the labels shifted to the positions that predict them.

Position t predicts token t+1, so the labels move one place left and the last position of each row is
ignored; in rows that pack several examples (``document_ids``) an example's last token does not predict the
next example's first either. Every schedule (``LoPTModel``, the pipeline, the ZO engine) unpacks through here.
"""

from __future__ import annotations

import torch

from lopt.data.sft import IGNORE_INDEX


def unpack_batch(batch):
    """``(input_ids, attention_mask, labels, document_ids)`` of a batch, the labels shifted (position t's is
    token t+1) and ignored (-100) past each row's end and across packed examples' borders."""
    if "input_ids" not in batch:
        raise ValueError("batch needs 'input_ids'")
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    # Position t predicts token t+1: shift left and ignore the last position.
    labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    document_ids = batch.get("document_ids")
    if document_ids is not None:  # nor does an example's last token predict the next example's first
        labels[:, :-1].masked_fill_(document_ids[:, 1:] != document_ids[:, :-1], IGNORE_INDEX)
    return input_ids, attention_mask, labels, document_ids
