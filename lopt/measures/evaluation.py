"""The held-out task score: token-weighted loss, answer-token accuracy and exact match of greedy answers.

Works on any Hugging Face causal LM (the trainer passes the wrapped model, ``lopt eval`` a loaded one).
Greedy answers are generated through the chat template the held-out prompts were rendered with, from
left-padded batches, and cut at the first end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lopt.data.sft import IGNORE_INDEX, EvalExample, Example, collate, render


def pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def eos_ids(hf_model, tokenizer) -> set[int]:
    """Every id the tokenizer, the model config or the generation config calls end-of-sequence."""
    found = set()
    generation_config = getattr(hf_model, "generation_config", None)
    for ids in (tokenizer.eos_token_id, hf_model.config.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        found.update(ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else [])
    return found


def chat_prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as a user turn through the chat template with the generation prompt, tokenised."""
    uses_template = bool(getattr(tokenizer, "chat_template", None))
    texts = [render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in prompts]
    return tokenizer(texts, add_special_tokens=not uses_template)["input_ids"]


@torch.no_grad()
def greedy_answers(hf_model, tokenizer, prompt_ids: Sequence[list[int]], max_new_tokens: int,
                   batch_size: int, synced: bool = False) -> list[list[int]]:
    """Each prompt's greedy continuation, up to and including its first end-of-sequence token.

    ``synced``: the model is sharded across the ranks (``lopt.parallel.sharding``), which all generate the same
    answers; each keeps running forwards until every rank is done, since each forward gathers weights."""
    from transformers import GenerationConfig

    eos, pad = eos_ids(hf_model, tokenizer), pad_id(tokenizer)
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                  eos_token_id=sorted(eos) or None)
    device = next(hf_model.parameters()).device
    answers = []
    for i in range(0, len(prompt_ids), batch_size):
        part = prompt_ids[i : i + batch_size]
        width = max(len(p) for p in part)
        # Left padding: every prompt ends where generation starts.
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in part], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part], device=device)
        out = hf_model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_config,
                                 synced_gpus=synced)
        for row in out[:, width:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            answers.append(row[:cut])
    return answers


@torch.no_grad()
def task_score(hf_model, tokenizer, held_out: tuple[Sequence[Example], Sequence[EvalExample]], batch_size: int,
               max_generated: int, synced: bool = False) -> dict:
    """Held-out loss and answer-token accuracy (teacher-forced, token-weighted) over every example, and
    the exact match of greedy answers (whitespace-stripped) on the first ``max_generated`` prompts."""
    full, prompts = held_out
    was_training = hf_model.training
    hf_model.eval()
    device = next(hf_model.parameters()).device
    loss_sum, n_correct, n_tokens = 0.0, 0, 0
    for i in range(0, len(full), batch_size):
        part = full[i : i + batch_size]
        if sum(e.num_label_tokens for e in part):
            batch = {k: v.to(device) for k, v in collate(part, pad_id(tokenizer)).items()}
            logits = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
            loss_sum += F.cross_entropy(logits.transpose(1, 2), labels, reduction="sum").item()
            answered = labels != IGNORE_INDEX
            n_correct += (logits.argmax(-1) == labels)[answered].sum().item()
            n_tokens += answered.sum().item()
    prompts = list(prompts[:max_generated])
    longest = max((len(tokenizer(p.answer, add_special_tokens=False)["input_ids"]) for p in prompts), default=1)
    answer_ids = greedy_answers(hf_model, tokenizer, [p.prompt_ids for p in prompts], min(256, longest + 8),
                                batch_size, synced)
    eos = eos_ids(hf_model, tokenizer)
    generated = [tokenizer.decode(ids[:-1] if ids and ids[-1] in eos else ids, skip_special_tokens=True)
                 for ids in answer_ids]
    correct = sum(g.strip() == p.answer.strip() for g, p in zip(generated, prompts))
    hf_model.train(was_training)
    return dict(
        loss=loss_sum / max(n_tokens, 1),
        token_accuracy=n_correct / max(n_tokens, 1),  # teacher-forced next-token accuracy on answers
        exact_match=correct / max(len(prompts), 1),
        correct=correct,
        num_generated=len(prompts),
        num_examples=len(full),
        samples=[dict(prompt=tokenizer.decode(p.prompt_ids), answer=p.answer, generated=g)
                 for p, g in zip(prompts[:5], generated[:5])],
    )
