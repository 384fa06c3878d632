"""What several engine tests share: the families, a padded batch with a masked prompt, gradient comparisons."""

import torch

FAMILIES = {"llama": False, "qwen2": True, "qwen3": False, "mistral": False}  # family -> tied embeddings


def padded_batch(vocab_size, batch_size=3, seq_len=19, seed=0):
    """Right-padded rows of different lengths, with the first few (prompt) tokens masked from the labels."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
    lengths = [seq_len, seq_len - 5, seq_len - 11][:batch_size]
    attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    for row, n in enumerate(lengths):
        attention_mask[row, :n] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
