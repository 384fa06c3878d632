"""The stacked scoring forward: G evaluations of one micro-batch in one no-grad pass, a loss per group.

The layers below the boundary K (and the embeddings) run once on the (B, T) batch; their output is
repeated G times along the batch, group g in rows g·B..(g+1)·B, and the layers from K on run on
(G·B, T) with the perturbed linears installed by the caller. Blocks, positions, rotary embeddings and
masks are LoPT's (``LoPTModel.unpack`` / ``layer_inputs`` / ``run_block`` / ``task_loss``), the runner's
``block_ranges`` being [(0, K), (K, L)].

Losses, per group (the batch decides which):
- causal LM (``input_ids``, ``attention_mask``, ``labels`` with -100 ignored, shifted inside): the mean
  cross-entropy over the label tokens; the final norm and the head run on those positions only;
- classification with single-token answers (``last_index`` (B,): the last prompt position,
  ``candidate_ids`` (B, C), ``label`` (B,): the answer's index among the candidates): the mean over
  examples of −log softmax over the C candidate logits, computed from the final hidden state at
  ``last_index`` with the head's candidate rows only (no full-vocabulary logits), and the accuracy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lopt_kernels.linear_cross_entropy import lm_head_weight

from lopt.engine.model import IGNORE_INDEX


class Scores(NamedTuple):
    """Per evaluation group g: ``loss`` (G,) fp32; ``accuracy`` (G,) fp32 (classification, else None);
    ``count``: the label tokens (causal LM) or examples (classification) each group's mean is over."""

    loss: torch.Tensor
    accuracy: torch.Tensor | None
    count: torch.Tensor


def is_classification(batch) -> bool:
    return "candidate_ids" in batch


def _repeat(t: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    return None if t is None else t.repeat(groups, *([1] * (t.dim() - 1)))


@torch.no_grad()
def stacked_scores(runner, batch, groups: int, installed) -> Scores:
    """``groups`` evaluations of ``batch``; ``installed``: a context in which the upper layers' linears are
    the perturbed ones. ``runner``: a ``LoPTModel`` whose blocks are [(0, K), (K, L)]."""
    input_ids, mask, labels, docs = runner.unpack(batch)
    batch_size, seq_len = input_ids.shape
    hidden = runner.model.model.embed_tokens(input_ids)
    if runner.block_ranges[0][1] > 0:
        hidden = runner.run_block(0, hidden, runner.layer_inputs(input_ids.shape, input_ids.device, mask, docs))
    hidden = _repeat(hidden, groups)
    upper = runner.layer_inputs((groups * batch_size, seq_len), input_ids.device, _repeat(mask, groups),
                                _repeat(docs, groups))
    with installed:
        hidden = runner.run_block(1, hidden, upper)
    hidden = hidden.view(groups, batch_size, seq_len, -1)
    if is_classification(batch):
        return classification_scores(runner, hidden, batch)
    return causal_lm_scores(runner, hidden, labels)


def causal_lm_scores(runner, hidden: torch.Tensor, labels: torch.Tensor) -> Scores:
    """Mean cross-entropy over the label tokens of each group; ``hidden`` (G, B, T, H), ``labels`` (B, T) shifted."""
    groups = hidden.shape[0]
    flat_labels = labels.reshape(-1)
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    hidden = hidden.flatten(1, 2).index_select(1, keep)  # (G, tokens, H): the head sees label positions only
    normed = runner.model.model.norm(hidden)
    targets = flat_labels.index_select(0, keep)
    losses = torch.stack([runner.task_loss(normed[g], targets).float() for g in range(groups)])
    return Scores(losses, None, torch.as_tensor(keep.numel(), device=losses.device))


def candidate_log_probs(normed: torch.Tensor, head, candidate_ids: torch.Tensor) -> torch.Tensor:
    """log softmax over the candidates' logits, fp32: ``normed`` (..., B, H) final-normed states,
    ``candidate_ids`` (B, C) -> (..., B, C). A plain linear head contributes its candidate rows only;
    any other head (an adapter) runs as a module on ``normed`` and its logits are gathered."""
    try:
        weight, bias = lm_head_weight(head)
    except ValueError:
        logits = head(normed).float()
        index = candidate_ids.expand(*logits.shape[:-2], *candidate_ids.shape)
        return F.log_softmax(logits.gather(-1, index), dim=-1)
    rows = weight[candidate_ids].float()  # (B, C, H)
    logits = torch.einsum("...bh,bch->...bc", normed.float(), rows)
    if bias is not None:
        logits = logits + bias[candidate_ids].float()
    return F.log_softmax(logits, dim=-1)


def classification_scores(runner, hidden: torch.Tensor, batch) -> Scores:
    """Mean −log p(label) over the examples of each group, and the accuracy; ``hidden`` (G, B, T, H)."""
    groups, batch_size = hidden.shape[:2]
    rows = torch.arange(batch_size, device=hidden.device)
    last = hidden[:, rows, batch["last_index"].to(hidden.device)]  # (G, B, H)
    log_probs = candidate_log_probs(runner.model.model.norm(last), runner.model.lm_head, batch["candidate_ids"])
    label = batch["label"].to(hidden.device).expand(groups, batch_size)
    losses = -log_probs.gather(-1, label[..., None]).squeeze(-1).mean(1)
    accuracy = (log_probs.argmax(-1) == label).float().mean(1)
    return Scores(losses, accuracy, torch.as_tensor(batch_size, device=losses.device))
