"""Tiny models, batches and oracles for the ZO engine's tests (tests/zo).

The oracle for a stacked scoring: materialise each evaluation's weights (the engine's trained weights
± ε·Z_{p,l}, in fp32) in a deep copy of the model and score it with the Hugging Face forward.
"""

import copy

import torch
import torch.nn.functional as F

from lopt.models.shapes import build_model, tiny_config

VOCAB = 64


def tiny_model(family: str = "llama", layers: int = 4, seed: int = 0):
    """A random fp32 causal LM, hidden 32. Qwen2: q/k/v biases and tied embeddings."""
    extra = {"tie_word_embeddings": True} if family == "qwen2" else {}
    config = tiny_config(family, hidden_size=32, num_hidden_layers=layers, vocab_size=VOCAB, **extra)
    return build_model(config, seed=seed).eval()


def lm_batch(batch_size: int = 3, seq_len: int = 10, seed: int = 0, lengths=None) -> dict:
    """Right-padded causal-LM batch: row i has ``lengths[i]`` real tokens (default: a short last row)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=gen)
    lengths = lengths or [seq_len] * (batch_size - 1) + [seq_len - 4]
    mask = (torch.arange(seq_len)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def classification_batch(batch_size: int = 4, seq_len: int = 9, candidates: int = 3, seed: int = 0) -> dict:
    """Right-padded prompts, ``last_index`` at each one's end, ``candidates`` token ids per row and a label."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=gen)
    lengths = torch.randint(seq_len - 4, seq_len + 1, (batch_size,), generator=gen)
    mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "last_index": lengths - 1,
            "candidate_ids": torch.randint(0, VOCAB, (batch_size, candidates), generator=gen),
            "label": torch.randint(0, candidates, (batch_size,), generator=gen)}


def with_weights(model, weights: dict):
    """A deep copy of ``model`` whose parameters named in ``weights`` hold those values."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
    return out.eval()


def hf_loss(model, batch) -> float:
    """The batch's loss by the Hugging Face forward: causal LM, or candidates' log softmax (full logits)."""
    with torch.no_grad():
        if "candidate_ids" not in batch:
            return model(**batch).loss.item()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        return -candidate_log_probs_full(logits, batch).gather(1, batch["label"][:, None]).mean().item()


def candidate_log_probs_full(logits, batch):
    """log softmax over the candidates' columns of the full-vocabulary logits at ``last_index``."""
    rows = torch.arange(logits.shape[0])
    last = logits[rows, batch["last_index"]]  # (B, V)
    return F.log_softmax(last.gather(1, batch["candidate_ids"]), dim=-1)


def materialised_losses(model, engine, perturbation, batch) -> torch.Tensor:
    """The 2P losses scored one perturbed copy at a time: W_l ± ε·Z_{p,l} (fp32, W_l the trained weight)."""
    weights = engine.trained_weights()
    eps = engine.settings.eps
    out = []
    for p in range(perturbation.directions):
        z = {lin.name: perturbation.dense(p, l) for l, lin in enumerate(engine.linears)}
        for sign in (1.0, -1.0):
            out.append(hf_loss(with_weights(model, {n: w + sign * eps * z[n] for n, w in weights.items()}), batch))
    return torch.tensor(out, dtype=torch.float64)
