"""Classification scores: every candidate scored from one forward's last prompt position, with only the
candidates' rows of the output head.

For a batch of ``lopt.data.classification.collate_classification``, the logits of the candidates are
``h_last @ W_head[candidate_ids]ᵀ`` (plus the head's bias, if it has one), ``h_last`` being the decoder's
final hidden state (after its final norm) at ``last_index``. They equal the full-vocabulary logits at that
position restricted to the candidates, and a cross-entropy over them equals one over the candidates'
full-vocabulary log-probabilities (the normaliser cancels): MeZO's classification loss for single-token
answers, without the (B, T, V) logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lopt.data.classification import ClassificationExample, collate_classification


class ClassificationScore(NamedTuple):
    accuracy: float  # share of rows whose right candidate has the highest logit
    loss: float  # mean cross-entropy over the candidates
    count: int  # rows scored


def decoder(model):
    """The model's decoder stack (``model.model`` in Hugging Face Llama / Qwen / Mistral), whose
    ``last_hidden_state`` already went through the final norm."""
    inner = getattr(model, "model", None)
    return inner if inner is not None else model.base_model


def candidate_logits(model, batch: dict) -> torch.Tensor:
    """(B, C) logits of each row's candidates at its last prompt position, in the model's dtype."""
    hidden = decoder(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    h_last = hidden[rows, batch["last_index"]]  # (B, H)
    head = model.get_output_embeddings()
    weight = head.weight[batch["candidate_ids"]]  # (B, C, H): only the candidates' rows
    logits = torch.einsum("bh,bch->bc", h_last.to(weight.dtype), weight)
    bias = getattr(head, "bias", None)
    return logits if bias is None else logits + bias[batch["candidate_ids"]]


def candidate_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the candidates (in fp32 at least): a ``loss_fn(model, batch)`` for the ZO steps."""
    return F.cross_entropy(_at_least_fp32(candidate_logits(model, batch)), batch["label"])


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


@torch.no_grad()
def accuracy(model, examples: Sequence[ClassificationExample], batch_size: int,
             pad_token_id: int = 0) -> ClassificationScore:
    """Accuracy and mean candidate cross-entropy over ``examples``, in eval mode (the model's mode is restored).
    The pad id only fills positions the mask hides and the causal scoring never reads."""
    if not examples:
        raise ValueError("accuracy needs at least one example")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate_classification(examples[i : i + batch_size],
                                                                        pad_token_id).items()}
            logits = _at_least_fp32(candidate_logits(model, batch))
            loss_sum += F.cross_entropy(logits, batch["label"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["label"]).sum().item()
    finally:
        model.train(was_training)
    return ClassificationScore(correct / len(examples), loss_sum / len(examples), len(examples))
