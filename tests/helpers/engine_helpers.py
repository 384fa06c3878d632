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


class Rows(torch.utils.data.Dataset):
    """Fixed-length rows for the Trainer. Prompts masked alike (3 tokens), so every micro-batch has the same
    share of label tokens; or, with ``varied_prompts``, 2 to 6, so the token weighting matters."""

    def __init__(self, vocab_size, n=16, seq_len=12, varied_prompts=False):
        g = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(0, vocab_size, (n, seq_len), generator=g)
        self.varied_prompts = varied_prompts

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        labels = self.input_ids[i].clone()
        labels[: 2 + i % 5 if self.varied_prompts else 3] = -100
        return dict(input_ids=self.input_ids[i], attention_mask=torch.ones_like(labels), labels=labels)
