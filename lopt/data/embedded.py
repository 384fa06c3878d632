"""The embedded defaults' SFT sets, generated in code so that exact match means something.

``record_splits``: the real default's task (SmolLM2-135M-Instruct). A sentence about a person
("Maria is 34 and lives in Lisbon.") becomes a fixed record format ("name=Maria; age=34;
city=Lisbon"): an instruct model answers in prose out of the box, and learns the format, which copies
the three fields from the prompt, in a few dozen steps. The held-out sentences use names and cities
the training split never pairs, and sentence patterns drawn from the same set.

``sft_splits``: the random-init toy's set (``--model tiny``): seven task kinds (addition, comparison,
reversal, capitals, last letter, repetition, length) with one-line answers.

Both are the same on every machine (their own fixed seed, independent of ``--seed``), and no held-out
prompt appears in the training split.
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


# ------------------------------------------------------------------------------ the real default's task

RECORD_TRAIN_SIZE = 2000
RECORD_HELD_OUT_SIZE = 40
RECORD_SYSTEM = "Reply with the record only."
_NAMES = ("Maria", "John", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Ivan", "Chloe", "Mateo",
          "Sara", "David", "Mei", "Ahmed", "Nina", "Lucas", "Emma", "Raj", "Olga", "Pedro", "Hana", "Sam")
_CITIES = ("Lisbon", "Paris", "Tokyo", "Cairo", "Berlin", "Lima", "Delhi", "Boston", "Rome", "Oslo", "Madrid",
           "Seoul", "Dublin", "Sydney", "Vienna", "Nairobi", "Prague", "Toronto", "Athens", "Milan")
_PATTERNS = (
    "{name} is {age} and lives in {city}.",
    "{name}, aged {age}, lives in {city}.",
    "In {city} lives {name}, who is {age}.",
    "{name} ({age}) is from {city}.",
)


def _record(name: str, age: int, city: str, pattern: str) -> list[dict]:
    sentence = pattern.format(name=name, age=age, city=city)
    return [{"role": "system", "content": RECORD_SYSTEM},
            {"role": "user", "content": f"Format as a record: {sentence}"},
            {"role": "assistant", "content": f"name={name}; age={age}; city={city}"}]


def record_splits(train_size: int = RECORD_TRAIN_SIZE,
                  held_out_size: int = RECORD_HELD_OUT_SIZE) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)`` rows of ``{"messages"}``: a short system line, the sentence, the record."""
    rng = random.Random(_GENERATOR_SEED + 1)
    pairs = [(n, c) for n in _NAMES for c in _CITIES]
    rng.shuffle(pairs)
    held_pairs, train_pairs = pairs[:held_out_size], pairs[held_out_size:]

    def rows(pairs_, size):
        return [{"messages": _record(*pairs_[i % len(pairs_)][:1], rng.randint(18, 90), pairs_[i % len(pairs_)][1],
                                     rng.choice(_PATTERNS))} for i in range(size)]

    held_out = rows(held_pairs, held_out_size)
    return rows(train_pairs, train_size), held_out


def default_rows(cfg) -> tuple[list[dict], list[dict]]:
    """The embedded task of a run with no ``--data`` (``cfg``: its ``TrainConfig``): the toy's SFT set for the
    toy, the record task (chat format) for a real model."""
    return sft_splits() if cfg.embedded_model else record_splits()
