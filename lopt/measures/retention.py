"""What post-training keeps: two retention measures of a causal LM, deterministic and offline.

``general_nll``: the mean next-token negative log-likelihood (nats per token) on general English text that
ships with every Python, the language reference in ``pydoc_data.topics`` (``general_text``, ``text_nll``).
``kl_from_reference``: on ``GENERAL_PROMPTS`` with the reference model's own greedy answers appended, the
full-vocabulary KL(reference || model) at every position that predicts an answer token, and ``answer_nll``;
the reference's log-probabilities are computed once (``Reference``), so no second model stays in memory.

Both are teacher-forced on the reference's answers, so they cannot see the model's *own* answers change (a
model that now answers every prompt in a task's format can keep a small KL). ``own_answers`` does: the
model's greedy answers to the same prompts, against the reference's (``answers_agreement``).
``RetentionProbe`` takes them all; what they read as and what runs measured: docs/real-model.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lopt.measures.evaluation import chat_prompt_ids, greedy_answers, pad_id

GENERAL_TEXT_TOKENS = 2048  # two forward passes of these cost about 20 s of the real default's 4 minutes
MAX_CHUNK_LEN = 256
ANSWER_TOKENS = 32
AGREEMENT_TOKENS = 8
NUM_SAMPLES = 4

GENERAL_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "What does a bee do?",
    "Explain what a rainbow is in one sentence.",
    "Name a fruit that is yellow.",
    "How many days are there in a week?",
    "What is the opposite of hot?",
    "Write a short greeting for a friend.",
    "Why do people sleep?",
    "What is water made of?",
    "Suggest a name for a pet cat.",
    "What is the largest planet in our solar system?",
    "How do I boil an egg?",
    "What is a verb?",
    "Describe the color blue to someone.",
    "What should I pack for a day at the beach?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Give me a synonym for happy.",
    "What is photosynthesis?",
    "How can I be more productive in the morning?",
    "Translate 'thank you' into Spanish.",
    "What is the main ingredient of bread?",
    "Tell me a fun fact about the ocean.",
)


def general_text(tokenizer, chunk_len: int, num_tokens: int = GENERAL_TEXT_TOKENS) -> torch.Tensor:
    """``[num_chunks, chunk_len]`` token ids of a fixed slice of ``pydoc_data.topics``: its topics in sorted
    order, joined by blank lines, the first ``num_tokens`` tokens (rounded down to whole chunks), cut into
    chunks of ``chunk_len`` tokens (the run's ``--seq-len``, at most ``MAX_CHUNK_LEN``)."""
    from pydoc_data.topics import topics

    chunk_len = min(chunk_len, MAX_CHUNK_LEN)
    pieces, length = [], 0
    for name in sorted(topics):  # enough characters for num_tokens of any tokenizer (>= 1 character a token)
        pieces.append(topics[name])
        length += len(topics[name]) + 2
        if length >= 2 * num_tokens:
            break
    # Longer than the model's context on purpose (it is cut into chunks next): no length warning.
    ids = tokenizer("\n\n".join(pieces), add_special_tokens=False, verbose=False)["input_ids"]
    num_chunks = min(len(ids), num_tokens) // chunk_len
    if num_chunks == 0:
        raise ValueError(f"the general text has {len(ids)} tokens, fewer than one chunk of {chunk_len}")
    return torch.tensor(ids[: num_chunks * chunk_len]).view(num_chunks, chunk_len)


@torch.no_grad()
def text_nll(hf_model, chunks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL (nats) over every predicted position of every chunk. Each chunk is scored on its
    own: positions 1 .. L-1, each from the tokens before it."""
    was_training = hf_model.training
    hf_model.eval()
    device = next(hf_model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch_size):
        ids = chunks[i : i + batch_size].to(device)
        logits = hf_model(input_ids=ids).logits[:, :-1].float()
        total += F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum").item()
        count += ids[:, 1:].numel()
    hf_model.train(was_training)
    return total / count


@dataclass
class Reference:
    """The reference model on the general prompts: prompt + its greedy answer, and its log-probabilities
    (``[positions, vocab]``, fp32) at the positions that predict answer tokens."""

    sequences: list[list[int]]
    answer_starts: list[int]
    log_probs: torch.Tensor
    answers: list[str]
    prompts: Sequence[str] = GENERAL_PROMPTS

    def prompt_ids(self) -> list[list[int]]:
        return [s[:start] for s, start in zip(self.sequences, self.answer_starts)]

    def answer_ids(self) -> list[list[int]]:
        return [s[start:] for s, start in zip(self.sequences, self.answer_starts)]


def _answer_log_probs(hf_model, sequences, answer_starts, batch_size, pad) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at the answer-predicting positions, and the answer tokens they predict."""
    device = next(hf_model.parameters()).device
    rows, targets = [], []
    for i in range(0, len(sequences), batch_size):
        part, starts = sequences[i : i + batch_size], answer_starts[i : i + batch_size]
        width = max(len(s) for s in part)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in part], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in part], device=device)
        logits = hf_model(input_ids=ids, attention_mask=mask).logits
        for row, (sequence, start) in enumerate(zip(part, starts)):
            # Position t predicts token t+1: the answer's tokens start..end-1 come from start-1..end-2.
            rows.append(F.log_softmax(logits[row, start - 1 : len(sequence) - 1].float(), dim=-1))
            targets.append(ids[row, start : len(sequence)])
    return torch.cat(rows), torch.cat(targets)


@torch.no_grad()
def reference(hf_model, tokenizer, batch_size: int, prompts: Sequence[str] = GENERAL_PROMPTS,
              answer_tokens: int = ANSWER_TOKENS) -> Reference:
    """What ``kl_from_reference`` compares against: computed once, on the model as loaded. Each prompt is
    rendered through the chat template with the generation prompt, and the model's own greedy answer, up to
    ``answer_tokens`` tokens including its end-of-sequence token, is appended to it."""
    was_training = hf_model.training
    hf_model.eval()
    prompt_ids = chat_prompt_ids(tokenizer, prompts)
    answers = greedy_answers(hf_model, tokenizer, prompt_ids, answer_tokens, batch_size)
    # An empty answer still has its first position: the model's choice to stop (or not) at once.
    answers = [a if a else [pad_id(tokenizer)] for a in answers]
    sequences = [list(p) + a for p, a in zip(prompt_ids, answers)]
    starts = [len(p) for p in prompt_ids]
    log_probs, _ = _answer_log_probs(hf_model, sequences, starts, batch_size, pad_id(tokenizer))
    hf_model.train(was_training)
    return Reference(sequences, starts, log_probs, [tokenizer.decode(a, skip_special_tokens=True) for a in answers],
                     tuple(prompts))


@torch.no_grad()
def kl_from_reference(hf_model, ref: Reference, batch_size: int, pad: int = 0) -> dict:
    """``kl`` (mean KL(reference || model) per answer position, nats) and ``answer_nll``.

    At every position that predicts an answer token, ``KL(p_ref || p_model) = sum_v p_ref(v) (log p_ref(v) -
    log p_model(v))`` over the whole vocabulary; ``kl`` is the mean over all those positions of all prompts
    (so 0 for the reference itself). ``answer_nll`` is the mean ``-log p_model`` of those answer tokens."""
    was_training = hf_model.training
    hf_model.eval()
    log_q, targets = _answer_log_probs(hf_model, ref.sequences, ref.answer_starts, batch_size, pad)
    hf_model.train(was_training)
    log_p = ref.log_probs.to(log_q.device)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    answer_nll = -log_q.gather(1, targets[:, None]).squeeze(1)
    return dict(kl=kl.mean().item(), answer_nll=answer_nll.mean().item())


def _kept_share(answer: list[int], original: list[int]) -> float:
    """The share of ``original``'s tokens that ``answer`` reproduces before its first different token."""
    same = next((i for i, (a, b) in enumerate(zip(answer, original)) if a != b), min(len(answer), len(original)))
    return same / len(original)


def answers_agreement(answers: Sequence[list[int]], originals: Sequence[list[int]]) -> dict:
    """``answer_agreement``, ``first_token_agreement`` and ``answer_kept`` of ``answers`` against ``originals``.

    ``answer_agreement``: the share of prompts whose first ``AGREEMENT_TOKENS`` answer tokens are the
    original's (all of them for a shorter answer); ``first_token_agreement``: the share that still start with
    the original's first token (a model that now answers in a task's format changes that token: ``name=`` for
    ``The``); ``answer_kept``: the mean share of the original's answer tokens reproduced before the first
    difference."""
    agree = sum(a[:AGREEMENT_TOKENS] == o[:AGREEMENT_TOKENS] for a, o in zip(answers, originals))
    first = sum(a[:1] == o[:1] for a, o in zip(answers, originals))
    kept = sum(_kept_share(a, o) for a, o in zip(answers, originals))
    return dict(answer_agreement=agree / len(originals), first_token_agreement=first / len(originals),
                answer_kept=kept / len(originals))


@torch.no_grad()
def own_answers(hf_model, tokenizer, ref: Reference, batch_size: int, synced: bool = False) -> dict:
    """The model's own greedy answers to the reference's prompts, against the reference's
    (``answers_agreement``); a few prompts with both answers are kept as samples."""
    was_training = hf_model.training
    hf_model.eval()
    originals = ref.answer_ids()
    answers = greedy_answers(hf_model, tokenizer, ref.prompt_ids(), max(map(len, originals)), batch_size, synced)
    hf_model.train(was_training)
    answers = [a if a else [pad_id(tokenizer)] for a in answers]  # as the reference's (an empty answer stops at once)
    samples = [dict(prompt=p, original=o, answer=tokenizer.decode(a, skip_special_tokens=True))
               for p, o, a in zip(ref.prompts[:NUM_SAMPLES], ref.answers, answers)]
    return dict(answers_agreement(answers, originals), answer_samples=samples)


class RetentionProbe:
    """The measures against the model as it was when the probe was built."""

    def __init__(self, hf_model, tokenizer, chunk_len: int, batch_size: int):
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.chunks = general_text(tokenizer, chunk_len)
        self.reference = reference(hf_model, tokenizer, batch_size)

    def measure(self, hf_model, *, synced: bool = False, as_built: bool = False) -> dict:
        """Every measure of ``hf_model``. ``synced``: the model is sharded (see ``greedy_answers``).
        ``as_built``: the model is unchanged since the probe was built, so its greedy answers are the
        reference's (greedy decoding is deterministic) and are not generated again."""
        kl = kl_from_reference(hf_model, self.reference, self.batch_size, pad_id(self.tokenizer))
        if as_built:
            originals = self.reference.answer_ids()
            samples = [dict(prompt=p, original=o, answer=o)
                       for p, o in zip(self.reference.prompts[:NUM_SAMPLES], self.reference.answers)]
            own = dict(answers_agreement(originals, originals), answer_samples=samples)
        else:
            own = own_answers(hf_model, self.tokenizer, self.reference, self.batch_size, synced)
        return dict(general_nll=text_nll(hf_model, self.chunks, self.batch_size), **kl, **own,
                    general_tokens=self.chunks.numel(), chunk_len=self.chunks.shape[1],
                    kl_positions=len(self.reference.log_probs))


# What each measure is called in the log, and how it is printed.
MEASURES = (("exact match", "exact_match", "{:.1%}"), ("accuracy", "accuracy", "{:.1%}"), ("task loss", "loss", "{:.4f}"),
            ("general-text NLL", "general_nll", "{:.4f}"), ("KL from the original", "kl", "{:.4f}"),
            ("NLL of the original's answers", "answer_nll", "{:.4f}"),
            (f"own answers agreeing with the original's (first {AGREEMENT_TOKENS} tokens)", "answer_agreement",
             "{:.0%}"),
            ("own answers starting as the original's (first token)", "first_token_agreement", "{:.0%}"),
            ("share of the original's answer tokens kept", "answer_kept", "{:.0%}"))


def sample_lines(result: dict, count: int = 2) -> list[str]:
    """A few general prompts with the original's answer and the model's own, one line each."""
    def short(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{sample['prompt']!r}: original {short(sample['original'])!r} -> now {short(sample['answer'])!r}"
            for sample in result.get("answer_samples", [])[:count]]


def before_after_lines(result: dict) -> list[str]:
    """``name: before -> after`` for every measure ``result`` and ``result["before"]`` both hold."""
    before = result.get("before", {})
    lines = []
    for name, key, fmt in MEASURES:
        if key in result and key in before:
            extra = f" ({before['correct']}/{before['num_generated']} -> {result['correct']}/{result['num_generated']})" \
                if key == "exact_match" else ""
            lines.append(f"{name}: {fmt.format(before[key])} -> {fmt.format(result[key])}{extra}")
    return lines
