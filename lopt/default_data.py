"""The embedded default's SFT set: short question/answer tasks generated in code, so exact match means something.

Seven task kinds (addition, comparison, reversal, capitals, last letter, repetition, length) with
one-line answers. The set is the same on every machine (its own fixed seed, independent of
``--seed``), and the held-out questions never appear in the training split.
"""

from __future__ import annotations

import random
import string

TRAIN_SIZE = 4000
HELD_OUT_SIZE = 200
_GENERATOR_SEED = 20240601


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def _addition(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", str(a + b)


def _comparison(rng):
    a, b = rng.sample(range(100), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _reversal(rng):
    word = _word(rng)
    return f"Reverse the letters of '{word}'.", word[::-1]


def _capitals(rng):
    word = _word(rng)
    return f"Write '{word}' in capital letters.", word.upper()


def _last_letter(rng):
    word = _word(rng)
    return f"What is the last letter of '{word}'?", word[-1]


def _repetition(rng):
    word, times = _word(rng)[:3], rng.randint(2, 4)
    return f"Repeat '{word}' {times} times.", word * times


def _length(rng):
    word = _word(rng)
    return f"How many letters are in '{word}'?", str(len(word))


TASKS = (_addition, _comparison, _reversal, _capitals, _last_letter, _repetition, _length)


def sft_splits(train_size: int = TRAIN_SIZE, held_out_size: int = HELD_OUT_SIZE) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)`` rows of ``{"question", "answer"}``; no question is in both."""
    rng = random.Random(_GENERATOR_SEED)
    rows, seen = [], set()
    # The task kinds have a few hundred to thousands of distinct questions; skip repeats.
    while len(rows) < train_size + held_out_size:
        question, answer = rng.choice(TASKS)(rng)
        if question not in seen:
            seen.add(question)
            rows.append({"question": question, "answer": answer})
    return rows[held_out_size:], rows[:held_out_size]
